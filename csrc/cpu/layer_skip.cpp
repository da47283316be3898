// CPU kernels of the layer-skipping ops. Every op is a set of row copies (a
// sample is one contiguous block in NCHW and in channels_last alike), run as
// one flat parallel loop over elements so that a few large samples still
// spread over all threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../activation.h"
#include "../known_indices.h"
#include "../sample_rows.h"
#include "vec_loops.h"

namespace laudnet_ops {
namespace {

constexpr int64_t kGrain = 32768;

// Calls f(row, first, last) for the element range [begin, end) of rows of R elements.
template <typename F>
void for_row_segments(int64_t begin, int64_t end, int64_t R, F&& f) {
  while (begin < end) {
    const int64_t row = begin / R, first = begin % R, last = std::min(R, first + (end - begin));
    f(row, first, last);
    begin += last - first;
  }
}

void fail_sel(const int32_t* sel, int64_t k, int64_t N, const char* op) {
  TORCH_CHECK(false, op, ": sel[", k, "] = ", sel[k], " is outside the batch [0, ", N, ")");
}

void check_sel_in_range(const at::Tensor& sel, int64_t N, const char* op) {
  const int32_t* s = sel.data_ptr<int32_t>();
  for (int64_t k = 0; k < sel.numel(); ++k)
    if (s[k] < 0 || s[k] >= N) fail_sel(s, k, N, op);
}

// slot[n] = k where sel[k] == n, or -1: proves sel in range and unique, and lets
// the out-of-place scatter make one pass over its output.
std::vector<int32_t> build_slots(const at::Tensor& sel, int64_t N, const char* op) {
  std::vector<int32_t> slot(static_cast<size_t>(N), -1);
  const int32_t* s = sel.data_ptr<int32_t>();
  for (int64_t k = 0; k < sel.numel(); ++k) {
    if (s[k] < 0 || s[k] >= N) fail_sel(s, k, N, op);
    TORCH_CHECK(slot[s[k]] < 0, op, ": sel[", slot[s[k]], "] and sel[", k, "] both name sample ", s[k],
                "; sel must be unique, as sample_gather returns it");
    slot[s[k]] = static_cast<int32_t>(k);
  }
  return slot;
}

// dst row k = src row rows[k].
template <typename scalar_t>
void copy_rows(const scalar_t* src, scalar_t* dst, const int32_t* rows, int64_t K, int64_t R) {
  at::parallel_for(0, K * R, kGrain, [&](int64_t begin, int64_t end) {
    for_row_segments(begin, end, R, [&](int64_t k, int64_t first, int64_t last) {
      const scalar_t* s = src + rows[k] * R;
      std::copy(s + first, s + last, dst + k * R + first);
    });
  });
}

// out[i] = act(res[i] + y[i]); out may be res.
template <typename scalar_t, Activation A>
void add_act(scalar_t* out, const scalar_t* res, const scalar_t* y, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, float>) {
    cpu::residual_bias_act_floats(out, res, y, nullptr, n, A == Activation::kRelu);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = activate<A>(acc_t(res[i]) + acc_t(y[i]));
  }
}

template <typename scalar_t, Activation A>
void scatter_rows(const scalar_t* res, const scalar_t* y, scalar_t* out, const int32_t* slot, int64_t N, int64_t R) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, N * R, kGrain, [&](int64_t begin, int64_t end) {
    for_row_segments(begin, end, R, [&](int64_t n, int64_t first, int64_t last) {
      const scalar_t* r = res + n * R;
      scalar_t* o = out + n * R;
      if (slot[n] < 0) {
        for (int64_t i = first; i < last; ++i) o[i] = activate<A>(acc_t(r[i]));
      } else {
        add_act<scalar_t, A>(o + first, r + first, y + slot[n] * R + first, last - first);
      }
    });
  });
}

// In place: visits only the selected rows, so the cost follows K, not N.
template <typename scalar_t, Activation A>
void scatter_rows_inplace(scalar_t* res, const scalar_t* y, const int32_t* sel, int64_t K, int64_t R) {
  at::parallel_for(0, K * R, kGrain, [&](int64_t begin, int64_t end) {
    for_row_segments(begin, end, R, [&](int64_t k, int64_t first, int64_t last) {
      scalar_t* r = res + sel[k] * R;
      add_act<scalar_t, A>(r + first, r + first, y + k * R + first, last - first);
    });
  });
}

// r[i] = act(r[i] + y[i]) and sum[i] += r[i] over n values.
template <typename scalar_t, Activation A>
void add_act_sum(scalar_t* r, const scalar_t* y, at::opmath_type<scalar_t>* sum, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, float>) {
    cpu::residual_act_sum_floats(r, y, sum, n, A == Activation::kRelu);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      r[i] = activate<A>(acc_t(r[i]) + acc_t(y[i]));
      sum[i] += acc_t(r[i]);
    }
  }
}

// The in-place scatter of (K, C, HW) rows that also writes each updated row's channel means to
// pooled[sel[k]] while the values are in registers: the next block's masker then needs no pass of
// its own over the map.
template <typename scalar_t, Activation A>
void scatter_rows_inplace_pooled(scalar_t* res, const scalar_t* y, const int32_t* sel, scalar_t* pooled, int64_t K,
                                 int64_t C, int64_t HW, bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = C * HW;
  const acc_t inv = acc_t(1) / acc_t(HW);  // HW = 0 gives NaN means, as torch.mean of nothing
  if (!channels_last) {  // each (row, channel) plane is contiguous: one item per plane
    at::parallel_for(0, K * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(HW, 1)), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t k = i / C, c = i % C;
        scalar_t* r = res + sel[k] * R + c * HW;
        add_act<scalar_t, A>(r, r, y + k * R + c * HW, HW);
        acc_t sum = 0;
        for (int64_t p = 0; p < HW; ++p) sum += acc_t(r[p]);
        pooled[sel[k] * C + c] = scalar_t(sum * inv);
      }
    });
    return;
  }
  // channels_last: chunks of pixels, each with its own channel sums, added up per row afterwards.
  const int64_t chunk = std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1));
  const int64_t per_row = std::max<int64_t>(1, ceil_div(HW, chunk));
  std::vector<acc_t> partial(static_cast<size_t>(K * per_row * C), acc_t(0));
  at::parallel_for(0, K * per_row, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t k = i / per_row, p0 = (i % per_row) * chunk, p1 = std::min(HW, p0 + chunk);
      scalar_t* r = res + sel[k] * R;
      const scalar_t* yk = y + k * R;
      acc_t* sum = partial.data() + i * C;
      for (int64_t p = p0; p < p1; ++p) add_act_sum<scalar_t, A>(r + p * C, yk + p * C, sum, C);
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      acc_t sum = 0;
      for (int64_t j = 0; j < per_row; ++j) sum += partial[(k * per_row + j) * C + c];
      pooled[sel[k] * C + c] = scalar_t(sum * inv);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> sample_gather_cpu(const at::Tensor& x, const at::Tensor& gates) {
  const char* op = "sample_gather";
  SampleRows s = check_sample_gather_args(x, gates, op);
  const at::Tensor g = gates.contiguous();
  const bool* on = g.data_ptr<bool>();
  s.K = std::count(on, on + s.N, true);
  at::Tensor sel = at::empty({s.K}, gates.options().dtype(at::kInt));
  int32_t* sp = sel.data_ptr<int32_t>();
  for (int64_t n = 0; n < s.N; ++n)
    if (on[n]) *sp++ = static_cast<int32_t>(n);
  remember_indices(sel, {s.N});
  const at::MemoryFormat layout = feature_layout(x);
  at::Tensor out = at::empty(rows_shape(x, s.K), x.options().memory_format(layout));
  if (out.numel() == 0) return {out, sel};
  const at::Tensor src = x.contiguous(layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "sample_gather_cpu", [&] {
    copy_rows(src.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), sel.data_ptr<int32_t>(), s.K, s.R);
  });
  return {out, sel};
}

at::Tensor sample_index_cpu(const at::Tensor& x, const at::Tensor& sel) {
  const char* op = "_sample_index";
  const SampleRows s = check_sample_index_args(x, sel, op);
  const at::Tensor idx = sel.contiguous();
  check_sel_in_range(idx, s.N, op);
  const at::MemoryFormat layout = feature_layout(x);
  at::Tensor out = at::empty(rows_shape(x, s.K), x.options().memory_format(layout));
  if (out.numel() == 0) return out;
  const at::Tensor src = x.contiguous(layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "sample_index_cpu", [&] {
    copy_rows(src.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), idx.data_ptr<int32_t>(), s.K, s.R);
  });
  return out;
}

at::Tensor sample_scatter_add_cpu(const at::Tensor& residual, const at::Tensor& y, const at::Tensor& sel,
                                  c10::string_view activation) {
  const char* op = "sample_scatter_add";
  const SampleRows s = check_sample_scatter_args(residual, y, sel, op);
  const Activation act = parse_activation(activation, op);
  const std::vector<int32_t> slot = build_slots(sel.contiguous(), s.N, op);
  const at::MemoryFormat layout = feature_layout(residual);
  at::Tensor out = at::empty(residual.sizes(), residual.options().memory_format(layout));
  if (out.numel() == 0) return out;
  const at::Tensor res = residual.contiguous(layout), yy = y.contiguous(layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, res.scalar_type(), "sample_scatter_add_cpu", [&] {
    with_activation(act, [&](auto A) {
      scatter_rows<scalar_t, decltype(A)::value>(res.data_ptr<scalar_t>(), yy.data_ptr<scalar_t>(),
                                                 out.data_ptr<scalar_t>(), slot.data(), s.N, s.R);
    });
  });
  return out;
}

void sample_scatter_add_inplace_cpu(const at::Tensor& residual, const at::Tensor& y, const at::Tensor& sel,
                                    c10::string_view activation) {
  const char* op = "sample_scatter_add_";
  const SampleRows s = check_sample_scatter_args(residual, y, sel, op);
  const Activation act = parse_activation(activation, op);
  const at::Tensor idx = sel.contiguous();
  build_slots(idx, s.N, op);  // in range and unique, or an error before any write
  if (s.K == 0 || residual.numel() == 0) return;
  const at::MemoryFormat layout = feature_layout(residual);
  // Strides we cannot address directly get a dense working copy, written back once.
  at::Tensor work = residual.is_contiguous(layout) ? residual : residual.contiguous(layout);
  const at::Tensor yy = y.contiguous(layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "sample_scatter_add_cpu_", [&] {
    with_activation(act, [&](auto A) {
      scatter_rows_inplace<scalar_t, decltype(A)::value>(work.data_ptr<scalar_t>(), yy.data_ptr<scalar_t>(),
                                                         idx.data_ptr<int32_t>(), s.K, s.R);
    });
  });
  if (!work.is_same(residual)) residual.copy_(work);
}

void sample_scatter_add_pool_cpu(const at::Tensor& residual, const at::Tensor& y, const at::Tensor& sel,
                                 const at::Tensor& pooled, c10::string_view activation) {
  const char* op = "sample_scatter_add_pool_";
  const SampleRows s = check_sample_scatter_args(residual, y, sel, op);
  check_pooled(residual, pooled, op);
  const Activation act = parse_activation(activation, op);
  const at::Tensor idx = sel.contiguous();
  build_slots(idx, s.N, op);  // in range and unique, or an error before any write
  if (s.K == 0) return;
  const at::MemoryFormat layout = feature_layout(residual);
  at::Tensor work = residual.is_contiguous(layout) ? residual : residual.contiguous(layout);
  at::Tensor means = pooled.is_contiguous() ? pooled : pooled.contiguous();
  const at::Tensor yy = y.contiguous(layout);
  const int64_t C = residual.size(1), HW = residual.size(2) * residual.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "sample_scatter_add_pool_cpu", [&] {
    with_activation(act, [&](auto A) {
      scatter_rows_inplace_pooled<scalar_t, decltype(A)::value>(
          work.data_ptr<scalar_t>(), yy.data_ptr<scalar_t>(), idx.data_ptr<int32_t>(), means.data_ptr<scalar_t>(),
          s.K, C, HW, layout == at::MemoryFormat::ChannelsLast);
    });
  });
  if (!work.is_same(residual)) residual.copy_(work);
  if (!means.is_same(pooled)) pooled.copy_(means);
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CPU, m) {
  m.impl("sample_scatter_add_pool_", &sample_scatter_add_pool_cpu);
  m.impl("sample_gather", &sample_gather_cpu);
  m.impl("sample_scatter_add", &sample_scatter_add_cpu);
  m.impl("sample_scatter_add_", &sample_scatter_add_inplace_cpu);
  m.impl("_sample_index", &sample_index_cpu);
}

}  // namespace laudnet_ops

// CPU kernel of masked_conv1x1: a 1x1 convolution on the pixels a mask keeps.
//
// In channels_last a pixel is one row of Cin (input) or Cout (output) values,
// so the convolution on a set of pixels is a GEMM on the gathered rows. The
// map's pixels are cut into consecutive runs holding about the same number of
// kept pixels, one task each. A task gathers its kept rows into a buffer of
// its own, multiplies them by the (Cin, Cout) weight and, per block of 64 rows
// still in L1, adds the bias, applies the activation and writes each row to
// its pixel; the dropped pixels' rows are zeroed. A run that is mostly kept
// (the centre of a kept region, a map with few holes) is instead multiplied
// whole, in place. A contiguous x is first copied to channels_last, like the
// other spatial kernels, and the result copied back.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../activation.h"
#include "../spatial_conv.h"
#include "row_gemm.h"
#include "vec_loops.h"
#include "weight_layout.h"

namespace laudnet_ops {
namespace {

// Kept pixels per chunk, at most: a few 64-row micro-kernel blocks per task.
constexpr int64_t kChunkRows = 256;
// A chunk whose pixels are at least this fraction kept is computed whole, dropped pixels included
// (then zeroed): gathering and scattering its rows would cost more than the few rows it saves.
constexpr int64_t kDenseNumerator = 7, kDenseDenominator = 8;

// A run of consecutive pixels [p0, p1) holding `kept` kept pixels: one task's share of the map.
struct PixelChunk {
  int64_t p0, p1, kept;
};

// Consecutive pixel ranges of about `rows` kept pixels each (the zero-kept tail joins the last).
std::vector<PixelChunk> split_by_kept(const bool* mask, int64_t pixels, int64_t rows) {
  std::vector<PixelChunk> chunks;
  PixelChunk c{0, 0, 0};
  for (int64_t p = 0; p < pixels; ++p) {
    c.kept += mask[p];
    if (c.kept == rows) {
      c.p1 = p + 1;
      chunks.push_back(c);
      c = PixelChunk{p + 1, p + 1, 0};
    }
  }
  c.p1 = pixels;
  if (c.kept > 0 || chunks.empty())
    chunks.push_back(c);
  else
    chunks.back().p1 = pixels;
  return chunks;
}

template <typename scalar_t, Activation A>
void masked_conv_nhwc(const scalar_t* x, const bool* mask, const scalar_t* wt, const scalar_t* bias,
                      const MaskedConvGeometry& g, const at::TensorOptions& opts, scalar_t* y) {
  int64_t R = 0;
  for (int64_t p = 0; p < g.pixels(); ++p) R += mask[p];
  // As many chunks per thread as rows allow, up to kChunkRows each: equal shares keep every core busy
  // to the end, and each chunk streams the weight once more.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks_wanted = threads * std::max<int64_t>(1, ceil_div(R, threads * kChunkRows));
  const int64_t per_chunk = std::max<int64_t>(1, ceil_div(R, chunks_wanted));
  const std::vector<PixelChunk> chunks = split_by_kept(mask, g.pixels(), per_chunk);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    at::Tensor buf = at::empty({per_chunk, g.Cin}, opts), out = at::empty({per_chunk, g.Cout}, opts);
    std::vector<int64_t> px;
    for (int64_t k = begin; k < end; ++k) {
      const PixelChunk c = chunks[k];
      const int64_t span = c.p1 - c.p0;
      if (c.kept * kDenseDenominator >= span * kDenseNumerator) {
        // Mostly kept: the whole run, read and written in place, costs less than gathering.
        scalar_t* dst = y + c.p0 * g.Cout;
        cpu::gemm_rowmajor_rows(span, g.Cout, g.Cin, x + c.p0 * g.Cin, g.Cin, wt, g.Cout, dst, g.Cout,
                                [&](int64_t b0, int64_t n) {
                                  for (int64_t r = b0; r < b0 + n; ++r) {
                                    if (mask[c.p0 + r])
                                      cpu::bias_act(dst + r * g.Cout, bias, g.Cout, A == Activation::kRelu);
                                    else
                                      std::fill_n(dst + r * g.Cout, g.Cout, scalar_t(0));
                                  }
                                });
        continue;
      }
      px.clear();
      for (int64_t p = c.p0; p < c.p1; ++p) {
        if (mask[p])
          px.push_back(p);
        else
          std::fill_n(y + p * g.Cout, g.Cout, scalar_t(0));
      }
      if (px.empty()) continue;
      scalar_t* rows_in = buf.data_ptr<scalar_t>();
      for (int64_t r = 0; r < c.kept; ++r) std::copy_n(x + px[r] * g.Cin, g.Cin, rows_in + r * g.Cin);
      scalar_t* tile = out.data_ptr<scalar_t>();
      cpu::gemm_rowmajor_rows(c.kept, g.Cout, g.Cin, rows_in, g.Cin, wt, g.Cout, tile, g.Cout,
                              [&](int64_t b0, int64_t n) {
                                for (int64_t r = b0; r < b0 + n; ++r) {
                                  cpu::bias_act(tile + r * g.Cout, bias, g.Cout, A == Activation::kRelu);
                                  std::copy_n(tile + r * g.Cout, g.Cout, y + px[r] * g.Cout);
                                }
                              });
    }
    cpu::gemm_release<scalar_t>();
  });
}

at::Tensor masked_conv1x1_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  const char* op = "masked_conv1x1";
  const MaskedConvGeometry g = check_masked_conv_args(x, mask, weight, bias, op);
  const Activation act = parse_activation(activation, op);
  const at::MemoryFormat layout = feature_layout(x);
  at::Tensor y = at::empty({g.N, g.Cout, g.H, g.W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() != 0) {
    const at::Tensor src = x.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor keep = mask.contiguous();
    // (Cin, Cout) row-major
    const at::Tensor wt = cpu::taps_major_weight(weight, 1);
    const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "masked_conv1x1_cpu", [&] {
      with_activation(act, [&](auto A) {
        masked_conv_nhwc<scalar_t, decltype(A)::value>(src.data_ptr<scalar_t>(), keep.data_ptr<bool>(),
                                                       wt.data_ptr<scalar_t>(),
                                                       b.defined() ? b.data_ptr<scalar_t>() : nullptr, g,
                                                       src.options(), y.data_ptr<scalar_t>());
      });
    });
  }
  return y.contiguous(layout);
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CPU, m) { m.impl("masked_conv1x1", &masked_conv1x1_cpu); }

}  // namespace laudnet_ops

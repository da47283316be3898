// CPU kernel of channel_gated_conv2d: the batched weight-gather convolution.
//
// Work is split into (sample, output-pixel tile) items run in parallel. For
// each sample the thread lists the active input and output channels of every
// convolution group and gathers the weight rows (active outputs) and columns
// (active inputs) into a small thread-local slice; each tile then im2col-packs
// only the active input channels of that tile (a bounded buffer, never a
// whole-map one) and runs one GEMM slice x tile, so FLOPs and input reads
// follow the gate density. Inactive output channels are written as exact zeros.
//
// Two layouts, each with its own packing order so every copy runs over
// contiguous memory: NCHW packs (channel, ky, kx) rows of pixels, channels_last
// packs pixels of (ky, kx, channel) runs. channels_last float32 kernels wider
// than a pixel pack no im2col operand: the tile's input rows are copied once
// into a band, and each kernel row is a GEMM over shifted views of it
// (ChannelConv::tile_band). The GEMMs go through row_gemm.h:
// float32 on ATen's oneDNN micro-kernel (the same one the dense oneDNN
// convolutions are built from, so the comparison with them is like for like),
// other dtypes on ATen mm calls (MKL) on views of the thread-local buffers.
// channels_last multiplies the packed tile by a weight slice stored
// [K, active outputs], the row-major B operand the micro-kernel takes.
//
// Small maps with large weights (ResNet stage 4) run weight-stationary instead, in channels_last
// float32: the weight is walked block by block, each block serving every sample of a pass while
// in L2 (ChannelConv::run_stationary). Grouped convolutions of at most 16 output channels per group
// are the other exception: they run as oneDNN's dense grouped convolution between gating passes
// (dense_grouped_is_faster).
//
// Each thread's GEMMs must run single-threaded: PyTorch turns MKL's dynamic
// threading off, so an MKL call inside an OpenMP region would open a nested
// team per call and oversubscribe the cores (measured 10-20x slower on 2
// threads). mkl_set_num_threads_local(1) pins this thread's MKL calls to one
// thread for the duration of the chunk. Independent per-thread GEMMs on
// (sample, tile) items beat one multi-threaded GEMM at a time with parallel
// packing in between, which needs several synchronisations per tile.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../activation.h"
#include "../channel_geometry.h"
#include "row_gemm.h"
#include "vec_loops.h"
#include "weight_layout.h"

// MKL's Fortran-convention setter (argument by pointer), exported by
// libtorch_cpu when torch is built with MKL. Weak, so a torch without it still
// loads this library; then the guard does nothing.
extern "C" int mkl_set_num_threads_local_(const int* nt) __attribute__((weak));

namespace laudnet_ops {
namespace {

// When active, keeps the MKL calls of the current thread single-threaded while
// alive (0 restores the global setting, which is what a fresh thread has).
class SequentialBlasGuard {
 public:
  explicit SequentialBlasGuard(bool active) : active_(active && mkl_set_num_threads_local_ != nullptr) {
    if (active_) {
      const int one = 1;
      previous_ = mkl_set_num_threads_local_(&one);
    }
  }
  ~SequentialBlasGuard() {
    if (active_) mkl_set_num_threads_local_(&previous_);
  }
  SequentialBlasGuard(const SequentialBlasGuard&) = delete;
  SequentialBlasGuard& operator=(const SequentialBlasGuard&) = delete;

 private:
  bool active_;
  int previous_ = 0;
};

// Packed-buffer budget per tile, in elements of the dense group width (1 MiB
// of float32, half of it at half the input channels on, about a core's L2):
// a 1x1 conv over a 28x28 map is one GEMM per sample, a 3x3 conv of 256
// channels 7 tiles of 112 pixels.
constexpr int64_t kColBudget = 262144;

// The smallest tile a map is cut into to give idle threads work: each tile's thread gathers the
// sample's whole weight slice, which below about this many pixels costs more than the product
// saves (a 7x7 map of 2048 -> 512 channels measured 1.3x slower cut in two, 1.05x whole).
constexpr int64_t kMinTileRows = 64;

// Below about this many (dense) FLOPs a chunk of work is not worth a thread.
constexpr int64_t kMinParallelFlops = 1 << 22;

// The weight-stationary schedule (ChannelConv::run_stationary), for small maps and large weights:
// maps of at most this many output pixels, weights of at least this many elements.
constexpr int64_t kStationaryMaxPixels = 64;
constexpr int64_t kStationaryMinWeight = 1 << 18;
// Its blocks: output channels per block, weight elements per (input channels x output block) block
// (kept in L2 while every sample of a pass reads it), and the elements of one pass's operands and
// accumulators (T x (input block + Cout) per sample, counted as if every channel were on).
constexpr int64_t kStationaryOutBlock = 512;
constexpr int64_t kStationaryWeightBlock = 1 << 18;
constexpr int64_t kStationaryPassBudget = 1 << 18;

struct Run {
  int64_t start, len;  // channels [start, start + len) relative to their convolution group
};

// Adds channel c, above every channel already listed, to runs; runs before index `first` belong to
// another list and are never extended.
inline void extend_runs(std::vector<Run>& runs, size_t first, int64_t c) {
  if (runs.size() > first && runs.back().start + runs.back().len == c)
    ++runs.back().len;
  else
    runs.push_back({c, 1});
}

// Whether the runs [first, last) all start at multiples of 4 and hold multiples of 4 channels (gate
// groups of 4k channels); if so, units receives their 4-channel starts.
inline bool unit_starts(const Run* first, const Run* last, std::vector<int32_t>& units) {
  units.clear();
  for (const Run* run = first; run != last; ++run) {
    if (run->start % 4 != 0 || run->len % 4 != 0) return false;
    for (int64_t c = run->start; c < run->start + run->len; c += 4) units.push_back(static_cast<int32_t>(c));
  }
  return true;
}

// Copies the channels of pixel (or weight row) src that the units (kBy4: 4-channel fixed-size
// copies the compiler inlines) or else the runs name into dst, in order.
template <bool kBy4, typename scalar_t>
inline void copy_channels(const scalar_t* src, scalar_t* dst, const Run* runs, int64_t nruns, const int32_t* units,
                          int64_t nunits) {
  if constexpr (kBy4) {
    for (int64_t u = 0; u < nunits; ++u, dst += 4) std::memcpy(dst, src + units[u], 4 * sizeof(scalar_t));
  } else {
    for (int64_t r = 0; r < nruns; ++r) dst = std::copy(src + runs[r].start, src + runs[r].start + runs[r].len, dst);
  }
}

// The channels a sample keeps, per convolution group g: idx[off[g] .. off[g+1])
// (relative to the group's first channel) and the same set as maximal runs.
struct Active {
  std::vector<int64_t> idx, off;
  std::vector<Run> runs;
  std::vector<int64_t> run_off;

  void collect(const bool* gates, int64_t per_group, int64_t groups, int64_t G) {
    idx.clear();
    runs.clear();
    off.assign(1, 0);
    run_off.assign(1, 0);
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t c = 0; c < per_group; ++c) {
        if (gates != nullptr && !gates[(g * per_group + c) / G]) continue;
        idx.push_back(c);
        extend_runs(runs, static_cast<size_t>(run_off.back()), c);
      }
      off.push_back(static_cast<int64_t>(idx.size()));
      run_off.push_back(static_cast<int64_t>(runs.size()));
    }
  }
  int64_t count(int64_t g) const { return off[g + 1] - off[g]; }
  const int64_t* begin(int64_t g) const { return idx.data() + off[g]; }
};

// unit_starts of a's channels of convolution group g (starts relative to the group).
inline bool unit_starts(const Active& a, int64_t g, std::vector<int32_t>& units) {
  return unit_starts(a.runs.data() + a.run_off[g], a.runs.data() + a.run_off[g + 1], units);
}

// Output positions o in [0, out) whose input o*s - p + kd falls inside [0, in).
inline void valid_outputs(int64_t in, int64_t out, int64_t s, int64_t p, int64_t kd, int64_t& lo, int64_t& hi) {
  lo = p - kd <= 0 ? 0 : (p - kd + s - 1) / s;
  const int64_t last = in - 1 + p - kd;
  hi = last < 0 ? 0 : last / s + 1;
  lo = std::min(lo, out);
  hi = std::max(lo, std::min(hi, out));
}

inline bool is_pointwise(const ConvGeometry& g) {
  return g.KH == 1 && g.KW == 1 && g.SH == 1 && g.SW == 1 && g.PH == 0 && g.PW == 0;
}

// Per-thread state: the current sample's channel lists and weight slices, and the tile buffers.
template <typename scalar_t>
struct Workspace {
  int64_t n = -1;
  Active in, out;
  std::vector<scalar_t> wslice, col, acc;
  // the active input channels of the group being packed, as 4-channel unit starts
  std::vector<int32_t> units;
  // the active output channels of the group being computed, one bit per channel, 16 to a word
  std::vector<uint16_t> keep;
  // per conv group: NCHW [n_out, K] rows, channels_last [K, n_out] rows; K in packing order
  std::vector<const scalar_t*> wptr;
  // per conv group: the distance between those rows (channels_last: at least n_out, see slice_ld)
  std::vector<int64_t> wld;
};

// The row distance of a channels_last weight slice of n_out columns. Rows a multiple of 1 KiB apart
// fall on a quarter or fewer of the L1 sets, so the rows of the micro-kernel's 64-column panel of
// the slice evict each other; one more 64-byte line per row spreads them over every set. Batch 8,
// 1x1 256 -> 1024 on 14x14 with half the inputs on, added to the residual (1024 active outputs, 4 KiB
// apart), the op alone in its process, 4 alternating pairs: 2.5-2.8 -> 2.1-2.3 ms (and 3.2-4.1 ->
// 2.8-2.9 ms in a slower spell of the machine); timed after other convolutions in the same process,
// within noise. The other shapes measured the same either way.
inline int64_t slice_ld(int64_t n_out, int64_t elem_size) {
  return (n_out * elem_size) % 1024 == 0 ? n_out + 64 / elem_size : n_out;
}

// accumulate: y holds a residual on entry and receives act(residual + conv) (the fused residual add of
// channel_gated_conv2d_add_); an inactive output channel then adds nothing instead of being zeroed.
// sums (or null): per work item, Cout channel sums of the item's finished output pixels, added while
// they are in cache (the channel means channel_gated_conv2d_add_ can return).
template <typename scalar_t, bool kChannelsLast>
class ChannelConv {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  ChannelConv(const ConvGeometry& g, const scalar_t* x, const scalar_t* w, const scalar_t* bias,
              const bool* in_gates, const bool* out_gates, scalar_t* y, bool accumulate, acc_t* sums)
      : g_(g), x_(x), w_(w), bias_(bias), in_gates_(in_gates), out_gates_(out_gates), y_(y),
        accumulate_(accumulate), sums_(sums) {
    KK_ = g.KH * g.KW;
    HWo_ = g.Ho * g.Wo;
    const int64_t k_dense = std::max<int64_t>(1, g.cin_g() * KK_);
    const int64_t want = std::max<int64_t>(16, kColBudget / k_dense);
    ntiles_ = std::max<int64_t>(1, ceil_div(HWo_, want));
    // Fewer samples than threads (batch 1): cut each map into at least one tile per thread, of at
    // least kMinTileRows pixels, instead of leaving threads idle.
    const int64_t threads = at::get_num_threads();
    if (g.N < threads)
      ntiles_ = std::max(ntiles_, std::min(ceil_div(threads, std::max<int64_t>(1, g.N)), HWo_ / kMinTileRows));
    T_ = std::max<int64_t>(1, ceil_div(HWo_, ntiles_));
    ntiles_ = std::max<int64_t>(1, ceil_div(HWo_, T_));
  }

  int64_t items() const { return g_.N * ntiles_; }
  int64_t tiles_per_sample() const { return ntiles_; }

  // Item boundaries [bounds[c], bounds[c + 1]) of `chunks` contiguous chunks of about equal work.
  // Each sample's gates set its work (the active channels' products plus the writes of every output
  // channel). With an even count of items per thread, the threads spent 8% of a 3x3 conv's samples
  // waiting for each other (64 channels on 56x56, batch 8, half the gate groups on), 4% with this split.
  std::vector<int64_t> balanced_split(int64_t chunks) const {
    std::vector<double> upto(items() + 1, 0.0);
    for (int64_t item = 0; item < items(); ++item) {
      const int64_t n = item / ntiles_, t0 = (item % ntiles_) * T_;
      const double in = on_channels(in_gates_, n, g_.Cin), out = on_channels(out_gates_, n, g_.Cout);
      const double per_pixel = in * out * KK_ / g_.groups + g_.Cout;
      upto[item + 1] = upto[item] + per_pixel * (std::min(HWo_, t0 + T_) - t0);
    }
    std::vector<int64_t> bounds(chunks + 1, items());
    for (int64_t c = 0; c < chunks; ++c)
      bounds[c] = std::lower_bound(upto.begin(), upto.end(), upto.back() * c / chunks) - upto.begin();
    return bounds;
  }
  void set_sums(acc_t* sums) { sums_ = sums; }

  // Items per parallel chunk: small convolutions run on one thread, where waking
  // the others would cost more than the work.
  int64_t grain() const {
    const int64_t flops = std::max<int64_t>(1, 2 * T_ * g_.cout_g() * g_.cin_g() * KK_ * g_.groups);
    return std::max<int64_t>(1, kMinParallelFlops / flops);
  }

  // Whether run_stationary computes this convolution: channels_last float32 on the micro-kernel, gates
  // given, one convolution group, a small map and a large weight, and at least two samples per
  // thread. There run()'s per-sample weight slices (each gathered from the whole weight, which is
  // read from memory again for every sample) cost about as much as the products on them. Batch 8,
  // half the gate groups on, a flushed cache, the per-sample build against this one in three
  // alternating pairs: 512 -> 512 3x3 on 7x7 3.7-4.3 -> 3.3-3.7 ms, the same at stride 2 from 14x14
  // 4.4-5.0 -> 3.6-4.2 ms, 1x1 2048 -> 512 (out-gated) 2.9-3.4 -> 2.7-3.0 ms, 1x1 512 -> 2048
  // (in-gated, added to a residual) 3.1-3.3 -> 2.6-2.9 ms. On 14x14 maps it measured no faster (3x3
  // over 256 channels) or slower (1x1 1024 -> 256), and ungated it only loses (run() then
  // multiplies by the weight in place).
  bool stationary() const {
    if constexpr (!kChannelsLast || !cpu::kGemmRowBlocks<scalar_t>) {
      return false;
    } else {
      const bool gated = in_gates_ != nullptr || out_gates_ != nullptr;
      return gated && g_.groups == 1 && HWo_ <= kStationaryMaxPixels &&
             KK_ * g_.Cin * g_.Cout >= kStationaryMinWeight && g_.N >= 2 * at::get_num_threads();
    }
  }

  template <Activation A>
  // sequential_blas: the items are split over threads, so each GEMM must stay on its thread.
  void run(int64_t begin, int64_t end, bool sequential_blas) const {
    const SequentialBlasGuard guard(sequential_blas);
    Workspace<scalar_t> ws;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / ntiles_, t0 = (item % ntiles_) * T_;
      const int64_t t1 = std::min(HWo_, t0 + T_);
      if (n != ws.n) load_sample(ws, n);
      acc_t* sums = sums_ ? sums_ + item * g_.Cout : nullptr;
      for (int64_t grp = 0; grp < g_.groups; ++grp) tile<A>(ws, n, grp, t0, t1, sums);
    }
    cpu::gemm_release<scalar_t>();
  }

  // Samples [s0, s1) (every tile of theirs), weight-stationary: the weight is walked block by block
  // (kStationaryWeightBlock elements of one tap's input channels x kStationaryOutBlock outputs),
  // and each block, while in L2, serves every sample of a pass: each gathers its active rows and
  // columns of the block and multiplies the matching input channels of its whole map into its own
  // accumulator. The weight is read from memory once per pass instead of once per sample.
  template <Activation A>
  void run_stationary(int64_t s0, int64_t s1) const {
    if constexpr (std::is_same_v<scalar_t, float>) stationary_passes<A>(s0, s1);
  }

 private:
  // One sample of a weight-stationary pass.
  struct StationarySample {
    Active in, out;
    std::vector<uint16_t> keep;    // active output channels, one bit each
    std::vector<int64_t> out_off;  // per output block, its first entry in out's list (and the end)
    std::vector<char> started;     // per output block, whether acc holds a partial sum
    std::vector<float> acc;        // per output block, [T, its active outputs], one after another
    std::vector<float> packed;     // the current input block's operand, [T, k], when not x itself
    const float* a = nullptr;      // that operand, lda apart
    int64_t lda = 0, k = 0;
    const int64_t* ins = nullptr;  // its k active input channels
  };

  template <Activation A>
  void stationary_passes(int64_t s0, int64_t s1) const {
    const int64_t Cin = g_.Cin, Cout = g_.Cout, T = HWo_;
    const int64_t ob = std::min(Cout, kStationaryOutBlock);
    const int64_t cb = std::min(Cin, std::max<int64_t>(4, kStationaryWeightBlock / ob / 4 * 4));
    const int64_t oblocks = ceil_div(Cout, ob);
    const int64_t per_pass = std::max<int64_t>(1, kStationaryPassBudget / (T * (cb + Cout)));
    std::vector<StationarySample> pass(per_pass);
    std::vector<float> wbuf;
    for (int64_t b0 = s0; b0 < s1; b0 += per_pass) {
      const int64_t b1 = std::min(s1, b0 + per_pass);
      for (int64_t n = b0; n < b1; ++n) start_sample(pass[n - b0], n, ob, oblocks);
      for (int64_t kk = 0; kk < KK_; ++kk) {
        for (int64_t c0 = 0; c0 < Cin; c0 += cb) {
          const int64_t c1 = std::min(Cin, c0 + cb);
          for (int64_t n = b0; n < b1; ++n) load_operand(pass[n - b0], n, kk, c0, c1);
          for (int64_t o = 0; o < oblocks; ++o) {  // each weight block, in L2 for every sample
            for (int64_t n = b0; n < b1; ++n) {
              StationarySample& sp = pass[n - b0];
              const int64_t j0 = sp.out_off[o], nout = sp.out_off[o + 1] - j0;
              if (sp.k == 0 || nout == 0) continue;
              gather_block(wbuf, kk, sp.ins, sp.k, sp.out.begin(0) + j0, nout, o * ob, std::min(Cout, (o + 1) * ob));
              cpu::gemm_rowmajor<float>(T, nout, sp.k, sp.a, sp.lda, wbuf.data(), nout, sp.acc.data() + T * j0, nout,
                                        /*accumulate=*/sp.started[o] != 0);
              sp.started[o] = 1;
            }
          }
        }
      }
      for (int64_t n = b0; n < b1; ++n) finish_sample<A>(pass[n - b0], n, ob, oblocks);
    }
    cpu::gemm_release<scalar_t>();
  }

  // The sample's channel lists, output bits, output blocks and accumulators.
  void start_sample(StationarySample& sp, int64_t n, int64_t ob, int64_t oblocks) const {
    const int64_t Cin = g_.Cin, Cout = g_.Cout, G = g_.G;
    sp.in.collect(in_gates_ ? in_gates_ + n * (Cin / G) : nullptr, Cin, 1, G);
    sp.out.collect(out_gates_ ? out_gates_ + n * (Cout / G) : nullptr, Cout, 1, G);
    const int64_t* outs = sp.out.begin(0);
    const int64_t nout = sp.out.count(0);
    sp.keep.assign((Cout + 15) / 16, 0);
    for (int64_t j = 0; j < nout; ++j) sp.keep[outs[j] / 16] |= static_cast<uint16_t>(1u << (outs[j] % 16));
    sp.out_off.resize(oblocks + 1);
    for (int64_t o = 0; o <= oblocks; ++o)
      sp.out_off[o] = std::lower_bound(outs, outs + nout, std::min(Cout, o * ob)) - outs;
    sp.started.assign(oblocks, 0);
    sp.acc.resize(HWo_ * nout);
  }

  // The sample's operand for tap kk and input channels [c0, c1): its active channels there, packed
  // per output pixel, or x itself for a pointwise conv with all of them on.
  void load_operand(StationarySample& sp, int64_t n, int64_t kk, int64_t c0, int64_t c1) const {
    const int64_t* first = sp.in.begin(0);
    const int64_t* last = first + sp.in.count(0);
    sp.ins = std::lower_bound(first, last, c0);
    sp.k = std::lower_bound(sp.ins, last, c1) - sp.ins;
    if (sp.k == 0 || sp.out.count(0) == 0) return;
    if (is_pointwise(g_) && sp.k == c1 - c0) {
      sp.a = x_ + n * HWo_ * g_.Cin + c0;
      sp.lda = g_.Cin;
      return;
    }
    pack_tap(sp.packed, n, kk, sp.ins, sp.k);
    sp.a = sp.packed.data();
    sp.lda = sp.k;
  }

  // Every channel of the sample's output pixels: act(acc + bias) on the active ones, 0 (or the
  // activated residual) on the others; then its channel sums.
  template <Activation A>
  void finish_sample(StationarySample& sp, int64_t n, int64_t ob, int64_t oblocks) const {
    const int64_t T = HWo_, Cout = g_.Cout;
    for (int64_t o = 0; o < oblocks; ++o) {
      const int64_t o0 = o * ob, j0 = sp.out_off[o], nout = sp.out_off[o + 1] - j0;
      float* acc = sp.acc.data() + T * j0;
      if (!sp.started[o]) std::fill(acc, acc + T * nout, 0.f);  // no active input: just the bias
      // Output blocks start at multiples of 16 channels, whole words of the output bits.
      cpu::expand_bias_act_rows(y_ + n * T * Cout + o0, Cout, acc, nout, T, sp.keep.data() + o0 / 16,
                                bias_ ? bias_ + o0 : nullptr, std::min(Cout, o0 + ob) - o0, A == Activation::kRelu,
                                accumulate_);
    }
    if (sums_) pool_pixels(y_ + n * T * Cout, T, Cout, sums_ + n * ntiles_ * Cout);
  }

  // The sorted channels c[0..count) as maximal runs, and unit_starts of them.
  static bool channel_runs(const int64_t* c, int64_t count, std::vector<Run>& runs, std::vector<int32_t>& units) {
    runs.clear();
    for (int64_t i = 0; i < count; ++i) extend_runs(runs, 0, c[i]);
    return unit_starts(runs.data(), runs.data() + runs.size(), units);
  }

  // wbuf[k, nout]: rows of tap kk for the input channels lo[0..k), columns outs[0..nout) (in [o0, o1)).
  void gather_block(std::vector<scalar_t>& wbuf, int64_t kk, const int64_t* lo, int64_t k, const int64_t* outs,
                    int64_t nout, int64_t o0, int64_t o1) const {
    wbuf.resize(k * nout);
    scalar_t* dst = wbuf.data();
    if (nout == o1 - o0) {  // every output of the block: whole row segments
      for (int64_t i = 0; i < k; ++i, dst += nout)
        std::memcpy(dst, w_ + (kk * g_.Cin + lo[i]) * g_.Cout + o0, nout * sizeof(scalar_t));
      return;
    }
    thread_local std::vector<Run> runs;
    thread_local std::vector<int32_t> units;
    const bool by4 = channel_runs(outs, nout, runs, units);
    const int64_t nruns = static_cast<int64_t>(runs.size()), nunits = static_cast<int64_t>(units.size());
    for (int64_t i = 0; i < k; ++i, dst += nout) {
      const scalar_t* row = w_ + (kk * g_.Cin + lo[i]) * g_.Cout;
      if (by4)
        copy_channels<true>(row, dst, runs.data(), nruns, units.data(), nunits);
      else
        copy_channels<false>(row, dst, runs.data(), nruns, units.data(), nunits);
    }
  }

  // packed[t, k]: per output pixel t of sample n, tap kk's input pixel on the channels ins[0..k)
  // (zeros outside the map).
  void pack_tap(std::vector<scalar_t>& packed, int64_t n, int64_t kk, const int64_t* ins, int64_t k) const {
    thread_local std::vector<Run> runs;
    thread_local std::vector<int32_t> units;
    const bool by4 = channel_runs(ins, k, runs, units);
    const int64_t nruns = static_cast<int64_t>(runs.size()), nunits = static_cast<int64_t>(units.size());
    packed.resize(HWo_ * k);
    scalar_t* dst = packed.data();
    const int64_t ky = kk / g_.KW, kx = kk % g_.KW;
    for (int64_t t = 0; t < HWo_; ++t, dst += k) {
      const int64_t iy = (t / g_.Wo) * g_.SH - g_.PH + ky * g_.DH;
      const int64_t ix = (t % g_.Wo) * g_.SW - g_.PW + kx * g_.DW;
      if (iy < 0 || iy >= g_.H || ix < 0 || ix >= g_.W) {
        std::fill_n(dst, k, scalar_t(0));
        continue;
      }
      const scalar_t* px = x_ + ((n * g_.H + iy) * g_.W + ix) * g_.Cin;
      if (by4)
        copy_channels<true>(px, dst, runs.data(), nruns, units.data(), nunits);
      else
        copy_channels<false>(px, dst, runs.data(), nruns, units.data(), nunits);
    }
  }

  // The sample's channel lists and, per convolution group, its weight slice
  // [active outputs, active inputs x KH x KW] (NCHW) or its transpose
  // (channels_last), in this layout's packing order. The weight w_ comes in the
  // same form: NCHW [Cout, K] rows, channels_last [groups][K, Cout_g].
  void load_sample(Workspace<scalar_t>& ws, int64_t n) const {
    ws.n = n;
    ws.in.collect(in_gates_ ? in_gates_ + n * (g_.Cin / g_.G) : nullptr, g_.cin_g(), g_.groups, g_.G);
    ws.out.collect(out_gates_ ? out_gates_ + n * (g_.Cout / g_.G) : nullptr, g_.cout_g(), g_.groups, g_.G);
    const int64_t Cin_g = g_.cin_g(), Cout_g = g_.cout_g(), K_dense = Cin_g * KK_;
    ws.wptr.assign(g_.groups, nullptr);
    ws.wld.assign(g_.groups, kChannelsLast ? Cout_g : K_dense);
    int64_t need = 0;
    for (int64_t grp = 0; grp < g_.groups; ++grp) {
      if (full(ws, grp)) continue;
      ws.wld[grp] = kChannelsLast ? slice_ld(ws.out.count(grp), sizeof(scalar_t)) : ws.in.count(grp) * KK_;
      need += ws.wld[grp] * (kChannelsLast ? ws.in.count(grp) * KK_ : ws.out.count(grp));
    }
    ws.wslice.resize(need);
    scalar_t* dst = ws.wslice.data();
    for (int64_t grp = 0; grp < g_.groups; ++grp) {
      const scalar_t* wg = w_ + grp * Cout_g * K_dense;
      if (full(ws, grp)) {  // every channel on: the dense rows are the slice
        ws.wptr[grp] = wg;
        continue;
      }
      ws.wptr[grp] = dst;
      const int64_t nout = ws.out.count(grp);
      const int64_t* outs = ws.out.begin(grp);
      if (kChannelsLast) {  // K rows (ky, kx, active ci), each the active outputs of that input
        // Whole rows, or 4-channel units, move as blocks: an element-wise gather of these
        // rows cost about half as much as the product itself for a 7x7 map.
        const bool all_out = nout == Cout_g;
        const bool by4 = !all_out && unit_starts(ws.out, grp, ws.units);
        const int32_t* units = ws.units.data();
        const int64_t nunits = by4 ? static_cast<int64_t>(ws.units.size()) : 0;
        const Run* out_runs = ws.out.runs.data() + ws.out.run_off[grp];
        const int64_t nout_runs = ws.out.run_off[grp + 1] - ws.out.run_off[grp];
        for (int64_t kk = 0; kk < KK_; ++kk)
          for (int64_t r = ws.in.run_off[grp]; r < ws.in.run_off[grp + 1]; ++r) {
            const Run& run = ws.in.runs[r];
            for (int64_t ci = run.start; ci < run.start + run.len; ++ci) {
              const scalar_t* src = wg + (kk * Cin_g + ci) * Cout_g;
              if (all_out)
                std::copy(src, src + Cout_g, dst);
              else if (by4)
                copy_channels<true>(src, dst, out_runs, nout_runs, units, nunits);
              else
                copy_channels<false>(src, dst, out_runs, nout_runs, units, nunits);
              dst += ws.wld[grp];
            }
          }
      } else {  // weight rows are (ci, ky, kx): a run of active channels is one contiguous copy
        // (one copy per channel and tap made batch-8 1x1 1024 -> 2048 on 14x14, half the outputs
        // on, 30 ms instead of 20; 512 -> 2048 on 7x7 9.3 instead of 3.5)
        for (int64_t j = 0; j < nout; ++j) {
          const scalar_t* row = wg + outs[j] * K_dense;
          for (int64_t r = ws.in.run_off[grp]; r < ws.in.run_off[grp + 1]; ++r) {
            const Run& run = ws.in.runs[r];
            dst = std::copy(row + run.start * KK_, row + (run.start + run.len) * KK_, dst);
          }
        }
      }
    }
  }

  // The channels of sample n that gates (null: all on) keep, of `channels`.
  int64_t on_channels(const bool* gates, int64_t n, int64_t channels) const {
    if (!gates) return channels;
    const int64_t per_sample = channels / g_.G;
    return std::count(gates + n * per_sample, gates + (n + 1) * per_sample, true) * g_.G;
  }

  bool full(const Workspace<scalar_t>& ws, int64_t grp) const {
    return ws.in.count(grp) == g_.cin_g() && ws.out.count(grp) == g_.cout_g();
  }

  template <Activation A>
  void tile(Workspace<scalar_t>& ws, int64_t n, int64_t grp, int64_t t0, int64_t t1, acc_t* sums) const {
    const int64_t T = t1 - t0, nin = ws.in.count(grp), nout = ws.out.count(grp);
    const int64_t K = nin * KK_;
    const bool all_out = nout == g_.cout_g();
    if (nout == 0) {
      if (accumulate_)
        activate_group<A>(n, grp, t0, t1);
      else
        zero_group(n, grp, t0, t1);
      if (sums) pool_tile(n, grp, t0, t1, sums);
      return;
    }
    if (banded()) return tile_band<A>(ws, n, grp, t0, t1, sums);
    // B operand: the packed tile, or the input itself for a pointwise conv reading every channel.
    const scalar_t* cols;
    int64_t ld_cols;
    if (is_pointwise(g_) && nin == g_.cin_g()) {
      cols = kChannelsLast ? x_ + (n * HWo_ + t0) * g_.Cin + grp * g_.cin_g()
                           : x_ + (n * g_.Cin + grp * g_.cin_g()) * HWo_ + t0;
      ld_cols = kChannelsLast ? g_.Cin : HWo_;
    } else {
      ws.col.resize(K * T);
      pack(ws, n, grp, t0, t1);
      cols = ws.col.data();
      ld_cols = kChannelsLast ? K : T;
    }
    if (kChannelsLast && cpu::kGemmRowBlocks<scalar_t> && K > 0) {
      tile_rows_nhwc<A>(ws, n, grp, t0, t1, cols, ld_cols, K, sums);
      return;
    }
    // C operand: straight into y when every output channel of the group is on (and y holds no residual).
    const bool direct = all_out && !accumulate_;
    if (!kChannelsLast && !direct && cpu::kGemmRowBlocks<scalar_t> && K > 0) {
      tile_cols_nchw<A>(ws, n, grp, t0, t1, cols, ld_cols, K);
      if (sums) pool_tile(n, grp, t0, t1, sums);
      return;
    }
    scalar_t* acc;
    int64_t ld_acc;
    if (direct) {
      acc = kChannelsLast ? y_ + (n * HWo_ + t0) * g_.Cout + grp * g_.cout_g()
                          : y_ + (n * g_.Cout + grp * g_.cout_g()) * HWo_ + t0;
      ld_acc = kChannelsLast ? g_.Cout : HWo_;
    } else {
      ws.acc.resize(nout * T);
      acc = ws.acc.data();
      ld_acc = kChannelsLast ? nout : T;
    }
    gemm(ws.wptr[grp], ws.wld[grp], nout, K, cols, ld_cols, T, acc, ld_acc);
    if (direct)
      epilogue_in_place<A>(grp, acc, ld_acc, T);
    else
      epilogue_scatter<A>(ws, n, grp, t0, t1, acc);
    if (sums) pool_tile(n, grp, t0, t1, sums);
  }

  // sums[c] += the group's finished outputs over pixels [t0, t1) of sample n.
  void pool_tile(int64_t n, int64_t grp, int64_t t0, int64_t t1, acc_t* sums) const {
    const int64_t Cout_g = g_.cout_g(), c0 = grp * Cout_g;
    if (kChannelsLast) {
      pool_pixels(y_ + (n * HWo_ + t0) * g_.Cout + c0, t1 - t0, Cout_g, sums + c0);
      return;
    }
    for (int64_t c = 0; c < Cout_g; ++c) {
      const scalar_t* row = y_ + (n * g_.Cout + c0 + c) * HWo_;
      acc_t s = 0;
      for (int64_t t = t0; t < t1; ++t) s += acc_t(row[t]);
      sums[c0 + c] += s;
    }
  }

  // sums[c] += px[c] for `pixels` channels_last pixels of `channels` values, g_.Cout apart.
  void pool_pixels(const scalar_t* px, int64_t pixels, int64_t channels, acc_t* sums) const {
    for (int64_t p = 0; p < pixels; ++p, px += g_.Cout) cpu::accumulate(sums, px, channels);
  }

  // channels_last with the row-block micro-kernel: each block of output pixels is finished (bias,
  // activation, and the scatter to the active channels with zeros between them) while its GEMM result
  // is in L1, so a partly gated group costs one small buffer instead of a tile-sized one.
  template <Activation A>
  void tile_rows_nhwc(Workspace<scalar_t>& ws, int64_t n, int64_t grp, int64_t t0, int64_t t1,
                      const scalar_t* cols, int64_t ld_cols, int64_t K, acc_t* sums) const {
    const int64_t T = t1 - t0, nout = ws.out.count(grp);
    if (nout == g_.cout_g()) {
      scalar_t* acc = y_ + (n * HWo_ + t0) * g_.Cout + grp * g_.cout_g();
      cpu::gemm_rowmajor_rows(
          T, nout, K, cols, ld_cols, ws.wptr[grp], ws.wld[grp], acc, g_.Cout,
          [&](int64_t r0, int64_t rows) {
            if (!sums) return epilogue_in_place<A>(grp, acc + r0 * g_.Cout, g_.Cout, rows);
            const scalar_t* b = bias_ ? bias_ + grp * g_.cout_g() : nullptr;
            for (int64_t r = r0; r < r0 + rows; ++r)  // finished and pooled in one pass
              cpu::bias_act_sum(acc + r * g_.Cout, b, sums + grp * g_.cout_g(), nout, A == Activation::kRelu);
          },
          /*accumulate=*/accumulate_);
      return;
    }
    ws.acc.resize(cpu::kGemmBlockM * nout);
    const int64_t c0 = grp * g_.cout_g();
    if constexpr (std::is_same_v<scalar_t, float>) set_keep_bits(ws, grp);
    for (int64_t r0 = 0; r0 < T; r0 += cpu::kGemmBlockM) {
      const int64_t rows = std::min(cpu::kGemmBlockM, T - r0);
      cpu::gemm_rowmajor<scalar_t>(rows, nout, K, cols + r0 * ld_cols, ld_cols, ws.wptr[grp], ws.wld[grp],
                                   ws.acc.data(), nout);
      if constexpr (std::is_same_v<scalar_t, float>) {
        cpu::expand_bias_act_rows(y_ + (n * HWo_ + t0 + r0) * g_.Cout + c0, g_.Cout, ws.acc.data(), nout, rows,
                                  ws.keep.data(), bias_ ? bias_ + c0 : nullptr, g_.cout_g(),
                                  A == Activation::kRelu, accumulate_);
      } else {
        epilogue_scatter<A>(ws, n, grp, t0 + r0, t0 + r0 + rows, ws.acc.data());
      }
      if (sums) pool_pixels(y_ + (n * HWo_ + t0 + r0) * g_.Cout + c0, rows, g_.cout_g(), sums + c0);
    }
  }

  // channels_last float32 without im2col, for kernels wider than a pixel whose taps along a row are
  // adjacent pixels (column dilation 1). The tile's input rows are copied once, with only the active
  // input channels and the zero padding, into a band whose rows are regrouped by phase (band row r
  // at r % SH * nb + r / SH) and RS = SW * Vw pixels long. Output pixel (oy, ox), at virtual index
  // v = oy * Vw + ox, then finds kernel row ky's KW taps as KW adjacent pixels from band pixel
  // SW * v + base(ky): each kernel row is one GEMM over uniformly strided operand rows (ld SW * nin,
  // K = KW * nin), accumulated over a block of virtual pixels. The Vw - Wo virtual pixels that close
  // each output row are computed and dropped. The band is a ninth of a 3x3 conv's im2col operand.
  // Batch 8, half the 4-channel gate groups on in and out, 3x3, against the im2col tiles (5 alternating
  // pairs, medians): 64 channels on 56x56 5.5 -> 4.6 ms, 128 channels from 56x56 at stride 2 4.0 ->
  // 3.5 ms; 128 on 28x28 and 256 on 14x14 (2 and 2/16 of the pixels dropped) within noise.
  bool banded() const { return kChannelsLast && cpu::kGemmRowBlocks<scalar_t> && !is_pointwise(g_) && g_.DW == 1; }

  template <Activation A>
  void tile_band(Workspace<scalar_t>& ws, int64_t n, int64_t grp, int64_t t0, int64_t t1, acc_t* sums) const {
    if constexpr (std::is_same_v<scalar_t, float>) {
      const int64_t nin = ws.in.count(grp), nout = ws.out.count(grp), Cout_g = g_.cout_g(), c0 = grp * Cout_g;
      const int64_t Wo = g_.Wo, SH = g_.SH, SW = g_.SW;
      const int64_t Vw = ceil_div(g_.W + 2 * g_.PW, SW), RS = SW * Vw;
      const int64_t oy0 = t0 / Wo, oy1 = (t1 - 1) / Wo;
      const int64_t nb = ceil_div((oy1 - oy0) * SH + (g_.KH - 1) * g_.DH + 1, SH);
      load_band(ws, n, grp, oy0, nb, RS);
      const int64_t v_first = t0 % Wo, v_end = (oy1 - oy0) * Vw + (t1 - 1) % Wo + 1;
      const int64_t k_row = g_.KW * nin;
      ws.acc.resize(cpu::kGemmBlockM * nout);
      float* acc = ws.acc.data();
      const float* b = bias_ ? bias_ + c0 : nullptr;
      set_keep_bits(ws, grp);
      for (int64_t v0 = v_first; v0 < v_end; v0 += cpu::kGemmBlockM) {
        const int64_t m = std::min(cpu::kGemmBlockM, v_end - v0);
        if (nin == 0) std::fill(acc, acc + m * nout, 0.f);  // no input channel on: just the bias
        for (int64_t ky = 0; ky < g_.KH && nin > 0; ++ky) {
          const int64_t r = ky * g_.DH;  // the band row of kernel row ky for output row oy0
          cpu::gemm_rowmajor<float>(m, nout, k_row, ws.col.data() + ((r % SH * nb + r / SH) * RS + SW * v0) * nin,
                                    SW * nin, ws.wptr[grp] + ky * k_row * ws.wld[grp], ws.wld[grp], acc, nout,
                                    /*accumulate=*/ky > 0);
        }
        for (int64_t v = v0; v < v0 + m;) {  // the block's real pixels, one output row's run at a time
          const int64_t ox = v % Vw, len = std::min(v0 + m - v, Vw - ox), real = std::clamp<int64_t>(Wo - ox, 0, len);
          if (real > 0) {
            float* px = y_ + (n * HWo_ + (oy0 + v / Vw) * Wo + ox) * g_.Cout + c0;
            cpu::expand_bias_act_rows(px, g_.Cout, acc + (v - v0) * nout, nout, real, ws.keep.data(), b, Cout_g,
                                      A == Activation::kRelu, accumulate_);
            if (sums) pool_pixels(px, real, Cout_g, sums + c0);
          }
          v += len;
        }
      }
    }
  }

  // The band of tile_band for output rows from oy0: SH phases of nb rows of RS pixels, each pixel the
  // group's active input channels or zeros (padding, and pixels no output reads). A dropped virtual
  // pixel's taps may run past the end of its band row, into the next one: the row the same kernel
  // row reads for the next output row, which exists, since only rows followed by another are dropped.
  void load_band(Workspace<scalar_t>& ws, int64_t n, int64_t grp, int64_t oy0, int64_t nb, int64_t RS) const {
    const int64_t nin = ws.in.count(grp), SH = g_.SH, rows = SH * nb, iy0 = oy0 * SH - g_.PH;
    const int64_t row_len = RS * nin;
    ws.col.resize(rows * row_len);
    scalar_t* band = ws.col.data();
    with_active_copy(ws, grp, [&](const auto& copy_active) {
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* dst = band + (r % SH * nb + r / SH) * row_len;
        const int64_t iy = iy0 + r;
        if (iy < 0 || iy >= g_.H) {
          std::fill(dst, dst + row_len, scalar_t(0));
          continue;
        }
        std::fill(dst, dst + g_.PW * nin, scalar_t(0));
        const scalar_t* px = x_ + (n * g_.H + iy) * g_.W * g_.Cin + grp * g_.cin_g();
        scalar_t* to = dst + g_.PW * nin;
        for (int64_t ix = 0; ix < g_.W; ++ix, px += g_.Cin, to += nin) copy_active(px, to);
        std::fill(to, dst + row_len, scalar_t(0));
      }
    });
  }

  // ws.keep: the group's active output channels, one bit each.
  void set_keep_bits(Workspace<scalar_t>& ws, int64_t grp) const {
    ws.keep.assign((g_.cout_g() + 15) / 16, 0);
    for (int64_t j = 0; j < ws.out.count(grp); ++j) {
      const int64_t c = ws.out.begin(grp)[j];
      ws.keep[c / 16] |= static_cast<uint16_t>(1u << (c % 16));
    }
  }

  // NCHW with some output channels off (or a residual in y), on the micro-kernel: the product is
  // cut into blocks of output pixels, each scattered to the channel planes while its [nout, block]
  // result is in L1, instead of one [nout, T] buffer the size of L2 read back after the product.
  // (16, 256, 28, 28) 1x1 with half the 4-channel output groups on: 5.7-5.8 -> 4.9-5.4 ms.
  template <Activation A>
  void tile_cols_nchw(Workspace<scalar_t>& ws, int64_t n, int64_t grp, int64_t t0, int64_t t1, const scalar_t* cols,
                      int64_t ld_cols, int64_t K) const {
    const int64_t nout = ws.out.count(grp);
    ws.acc.resize(nout * cpu::kGemmBlockN);
    for (int64_t c0 = t0; c0 < t1; c0 += cpu::kGemmBlockN) {
      const int64_t width = std::min(cpu::kGemmBlockN, t1 - c0);
      cpu::gemm_rowmajor<scalar_t>(nout, width, K, ws.wptr[grp], ws.wld[grp], cols + (c0 - t0), ld_cols, ws.acc.data(),
                                   width);
      epilogue_scatter<A>(ws, n, grp, c0, c0 + width, ws.acc.data());
    }
  }

  // NCHW: acc[nout, T] = w[nout, K] @ cols[K, T]; channels_last: acc[T, nout] = cols[T, K] @ w[K, nout]
  // (w's rows ld_w apart).
  void gemm(const scalar_t* w, int64_t ld_w, int64_t nout, int64_t K, const scalar_t* cols, int64_t ld_cols,
            int64_t T, scalar_t* acc, int64_t ld_acc) const {
    if (K == 0) {  // no input channel on: the convolution is just the bias
      for (int64_t r = 0; r < (kChannelsLast ? T : nout); ++r)
        std::fill(acc + r * ld_acc, acc + r * ld_acc + (kChannelsLast ? nout : T), scalar_t(0));
      return;
    }
    if (kChannelsLast)
      cpu::gemm_rowmajor<scalar_t>(T, nout, K, cols, ld_cols, w, ld_w, acc, ld_acc);
    else
      cpu::gemm_rowmajor<scalar_t>(nout, T, K, w, ld_w, cols, ld_cols, acc, ld_acc);
  }

  void pack(Workspace<scalar_t>& ws, int64_t n, int64_t grp, int64_t t0, int64_t t1) const {
    if (kChannelsLast)
      pack_nhwc(ws, n, grp, t0, t1);
    else
      pack_nchw(ws, n, grp, t0, t1);
  }

  // col[(i, ky, kx), t]: one row of the tile's output pixels per active channel and tap.
  void pack_nchw(Workspace<scalar_t>& ws, int64_t n, int64_t grp, int64_t t0, int64_t t1) const {
    const int64_t T = t1 - t0, nin = ws.in.count(grp);
    scalar_t* dst = ws.col.data();
    for (int64_t i = 0; i < nin; ++i) {
      const int64_t ci = grp * g_.cin_g() + ws.in.begin(grp)[i];
      const scalar_t* plane = x_ + (n * g_.Cin + ci) * g_.H * g_.W;
      for (int64_t ky = 0; ky < g_.KH; ++ky)
        for (int64_t kx = 0; kx < g_.KW; ++kx, dst += T) pack_row_nchw(plane, ky, kx, t0, t1, dst);
    }
  }

  void pack_row_nchw(const scalar_t* plane, int64_t ky, int64_t kx, int64_t t0, int64_t t1, scalar_t* dst) const {
    int64_t x_lo, x_hi;
    valid_outputs(g_.W, g_.Wo, g_.SW, g_.PW, kx * g_.DW, x_lo, x_hi);
    for (int64_t t = t0; t < t1;) {
      const int64_t oy = t / g_.Wo, ox0 = t % g_.Wo, ox1 = std::min(g_.Wo, ox0 + (t1 - t));
      const int64_t iy = oy * g_.SH - g_.PH + ky * g_.DH;
      scalar_t* out = dst + (t - t0) - ox0;  // out[ox] is the packed value of output column ox
      if (iy < 0 || iy >= g_.H) {
        std::fill(out + ox0, out + ox1, scalar_t(0));
      } else {
        const int64_t lo = std::clamp(x_lo, ox0, ox1), hi = std::clamp(x_hi, lo, ox1);
        std::fill(out + ox0, out + lo, scalar_t(0));
        const scalar_t* row = plane + iy * g_.W - g_.PW + kx * g_.DW;  // row[ox * SW] = x[iy, ix]
        if (g_.SW == 1) {
          std::copy(row + lo, row + hi, out + lo);
        } else {
          for (int64_t ox = lo; ox < hi; ++ox) out[ox] = row[ox * g_.SW];
        }
        std::fill(out + hi, out + ox1, scalar_t(0));
      }
      t += ox1 - ox0;
    }
  }

  // col[t, (ky, kx, i)]: per output pixel, the active channels of every tap. Gate groups of 4k
  // channels move as 4-channel units with fixed-size copies the compiler inlines; a call per run of
  // 4 channels cost more than the product itself for a 3x3 conv.
  void pack_nhwc(Workspace<scalar_t>& ws, int64_t n, int64_t grp, int64_t t0, int64_t t1) const {
    with_active_copy(ws, grp, [&](const auto& copy_active) { pack_taps_nhwc(ws, n, grp, t0, t1, copy_active); });
  }

  // f(copy_active), copy_active(px, dst) writing the group's active input channels of channels_last
  // pixel px to dst.
  template <typename F>
  void with_active_copy(Workspace<scalar_t>& ws, int64_t grp, const F& f) const {
    const Run* runs = ws.in.runs.data() + ws.in.run_off[grp];
    const int64_t nruns = ws.in.run_off[grp + 1] - ws.in.run_off[grp];
    if (ws.in.count(grp) % 4 == 0 && unit_starts(ws.in, grp, ws.units)) {
      const int32_t* units = ws.units.data();
      const int64_t nunits = static_cast<int64_t>(ws.units.size());
      f([&](const scalar_t* px, scalar_t* dst) { copy_channels<true>(px, dst, runs, nruns, units, nunits); });
      return;
    }
    f([&](const scalar_t* px, scalar_t* dst) { copy_channels<false>(px, dst, runs, nruns, nullptr, 0); });
  }

  // The tap walk of pack_nhwc; copy_active(px, dst) writes the group's active channels of pixel px.
  template <typename CopyActive>
  void pack_taps_nhwc(Workspace<scalar_t>& ws, int64_t n, int64_t grp, int64_t t0, int64_t t1,
                      const CopyActive& copy_active) const {
    const int64_t nin = ws.in.count(grp);
    scalar_t* dst = ws.col.data();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t oy = t / g_.Wo, ox = t % g_.Wo;
      for (int64_t ky = 0; ky < g_.KH; ++ky) {
        const int64_t iy = oy * g_.SH - g_.PH + ky * g_.DH;
        for (int64_t kx = 0; kx < g_.KW; ++kx, dst += nin) {
          const int64_t ix = ox * g_.SW - g_.PW + kx * g_.DW;
          if (iy < 0 || iy >= g_.H || ix < 0 || ix >= g_.W)
            std::fill_n(dst, nin, scalar_t(0));
          else
            copy_active(x_ + ((n * g_.H + iy) * g_.W + ix) * g_.Cin + grp * g_.cin_g(), dst);
        }
      }
    }
  }

  // The GEMM wrote the group's channels of y directly: add the bias and activate them.
  template <Activation A>
  void epilogue_in_place(int64_t grp, scalar_t* acc, int64_t ld_acc, int64_t T) const {
    const int64_t Cout_g = g_.cout_g();
    const scalar_t* b = bias_ ? bias_ + grp * Cout_g : nullptr;
    if (kChannelsLast) {
      for (int64_t t = 0; t < T; ++t) cpu::bias_act(acc + t * ld_acc, b, Cout_g, A == Activation::kRelu);
    } else {
      for (int64_t c = 0; c < Cout_g; ++c) {
        scalar_t* row = acc + c * ld_acc;
        const scalar_t bc = b ? b[c] : scalar_t(0);
        for (int64_t t = 0; t < T; ++t) row[t] = activate<A>(row[t] + bc);
      }
    }
  }

  // Some output channels of the group are off (or y holds a residual): write act(acc + bias) to the
  // active ones and 0 to the rest, or with a residual act(y + acc + bias) and act(y).
  template <Activation A>
  void epilogue_scatter(const Workspace<scalar_t>& ws, int64_t n, int64_t grp, int64_t t0, int64_t t1,
                        const scalar_t* acc) const {
    const int64_t T = t1 - t0, Cout_g = g_.cout_g(), c0 = grp * Cout_g, nout = ws.out.count(grp);
    const Run* runs = ws.out.runs.data() + ws.out.run_off[grp];
    const int64_t nruns = ws.out.run_off[grp + 1] - ws.out.run_off[grp];
    if (kChannelsLast) {
      for (int64_t t = 0; t < T; ++t) {
        scalar_t* px = y_ + (n * HWo_ + t0 + t) * g_.Cout + c0;
        const scalar_t* a = acc + t * nout;
        int64_t c = 0;
        for (int64_t r = 0; r < nruns; ++r) {
          off_channels<A>(px + c, px + runs[r].start);
          for (c = runs[r].start; c < runs[r].start + runs[r].len; ++c, ++a) {
            const scalar_t v = bias_ ? *a + bias_[c0 + c] : *a;
            px[c] = activate<A>(accumulate_ ? px[c] + v : v);
          }
        }
        off_channels<A>(px + c, px + Cout_g);
      }
    } else {
      int64_t j = 0;
      for (int64_t c = 0; c < Cout_g; ++c) {
        scalar_t* row = y_ + (n * g_.Cout + c0 + c) * HWo_ + t0;
        if (j < nout && ws.out.begin(grp)[j] == c) {
          const scalar_t* a = acc + j * T;
          const scalar_t bc = bias_ ? bias_[c0 + c] : scalar_t(0);
          if (accumulate_)
            for (int64_t t = 0; t < T; ++t) row[t] = activate<A>(row[t] + (a[t] + bc));
          else
            for (int64_t t = 0; t < T; ++t) row[t] = activate<A>(a[t] + bc);
          ++j;
        } else {
          off_channels<A>(row, row + T);
        }
      }
    }
  }

  // Values of y that no active output channel covers: 0, or act(residual) when y holds a residual.
  template <Activation A>
  void off_channels(scalar_t* first, scalar_t* last) const {
    if (!accumulate_)
      std::fill(first, last, scalar_t(0));
    else if (A != Activation::kNone)
      for (scalar_t* v = first; v < last; ++v) *v = activate<A>(*v);
  }

  // A group with every output channel off, y holding a residual: act(residual) over the tile.
  template <Activation A>
  void activate_group(int64_t n, int64_t grp, int64_t t0, int64_t t1) const {
    const int64_t Cout_g = g_.cout_g(), c0 = grp * Cout_g;
    if (kChannelsLast) {
      for (int64_t t = t0; t < t1; ++t) {
        scalar_t* px = y_ + (n * HWo_ + t) * g_.Cout + c0;
        off_channels<A>(px, px + Cout_g);
      }
    } else {
      for (int64_t c = 0; c < Cout_g; ++c) {
        scalar_t* row = y_ + (n * g_.Cout + c0 + c) * HWo_;
        off_channels<A>(row + t0, row + t1);
      }
    }
  }

  void zero_group(int64_t n, int64_t grp, int64_t t0, int64_t t1) const {
    const int64_t Cout_g = g_.cout_g(), c0 = grp * Cout_g;
    if (kChannelsLast) {
      for (int64_t t = t0; t < t1; ++t) {
        scalar_t* px = y_ + (n * HWo_ + t) * g_.Cout + c0;
        std::fill(px, px + Cout_g, scalar_t(0));
      }
    } else {
      for (int64_t c = 0; c < Cout_g; ++c) {
        scalar_t* row = y_ + (n * g_.Cout + c0 + c) * HWo_;
        std::fill(row + t0, row + t1, scalar_t(0));
      }
    }
  }

  const ConvGeometry g_;
  const scalar_t* x_;
  const scalar_t* w_;
  const scalar_t* bias_;
  const bool* in_gates_;
  const bool* out_gates_;
  scalar_t* y_;
  bool accumulate_;
  acc_t* sums_;
  int64_t KK_, HWo_, T_, ntiles_;
};

// Runs the convolution into y (laid out like x): y = act(conv), or with accumulate y = act(y + conv).
// means (or undefined): a contiguous (N, Cout) tensor that receives y's channel means.
void run_channel_conv(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& in_gates,
                      const c10::optional<at::Tensor>& out_gates, Activation act, at::Tensor& y, bool accumulate,
                      const at::Tensor& means = at::Tensor()) {
  const at::MemoryFormat layout = feature_layout(x);
  const bool nhwc = layout == at::MemoryFormat::ChannelsLast;
  const at::Tensor src = x.contiguous(layout);
  // channels_last packs (ky, kx, ci) and multiplies by [K, Cout_g] per group.
  const at::Tensor w = nhwc ? cpu::taps_major_weight(weight, g.groups) : weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor gin = in_gates.has_value() ? in_gates->contiguous() : at::Tensor();
  const at::Tensor gout = out_gates.has_value() ? out_gates->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "channel_gated_conv2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> sums;  // per work item, its pixels' channel sums
    const auto launch = [&](const auto& conv) {
      // One chunk of work (a small call, or one thread): run it here and let MKL use its threads.
      const bool split = at::get_num_threads() > 1 && conv.items() > conv.grain();
      if (!split) {
        with_activation(act, [&](auto A) { conv.template run<decltype(A)::value>(0, conv.items(), false); });
        return;
      }
      if (conv.stationary()) {
        at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
          with_activation(act, [&](auto A) { conv.template run_stationary<decltype(A)::value>(begin, end); });
        });
        return;
      }
      const int64_t chunks = std::min<int64_t>(at::get_num_threads(), ceil_div(conv.items(), conv.grain()));
      const std::vector<int64_t> bounds = conv.balanced_split(chunks);
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c)
          with_activation(act, [&](auto A) { conv.template run<decltype(A)::value>(bounds[c], bounds[c + 1], true); });
      });
    };
    const auto write_means = [&](int64_t tiles) {
      if (!means.defined()) return;
      scalar_t* m = means.data_ptr<scalar_t>();
      const acc_t inv = acc_t(1) / acc_t(g.Ho * g.Wo);
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t c = 0; c < g.Cout; ++c) {
          acc_t sum = 0;
          for (int64_t t = 0; t < tiles; ++t) sum += sums[(n * tiles + t) * g.Cout + c];
          m[n * g.Cout + c] = scalar_t(sum * inv);
        }
      }
    };
    const auto args = std::make_tuple(g, src.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                      b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                                      gin.defined() ? gin.data_ptr<bool>() : nullptr,
                                      gout.defined() ? gout.data_ptr<bool>() : nullptr, y.data_ptr<scalar_t>(),
                                      accumulate, static_cast<acc_t*>(nullptr));
    // The sums buffer is sized by the kernel's own work split, so it is attached once that is known.
    const auto run_into = [&](auto conv) {
      if (means.defined()) {
        sums.assign(static_cast<size_t>(conv.items() * g.Cout), acc_t(0));
        conv.set_sums(sums.data());
      }
      launch(conv);
      write_means(conv.tiles_per_sample());
    };
    if (nhwc)
      run_into(std::make_from_tuple<ChannelConv<scalar_t, true>>(args));
    else
      run_into(std::make_from_tuple<ChannelConv<scalar_t, false>>(args));
  });
}

// Grouped convolutions of at most 16 output channels per group (RegNetY's 8- and 16-channel groups):
// each per-group product is at most one vector of outputs wide, and with a quarter of the FLOPs
// (half of the gate groups on, in and out) measured 1.5-3x slower than oneDNN's dense grouped
// convolution, at batch 1 and 8. There the dense convolution runs on the gated input and the off
// output channels are zeroed afterwards: about the dense cost, instead of a multiple of it.
// laudnet_ops/_cpu_dispatch.py holds the same rule for the blocks and the latency predictor.
bool dense_grouped_is_faster(const ConvGeometry& g, const at::Tensor& x) {
  return g.groups > 1 && g.cout_g() <= 16 &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
}

// dst = act(src) on the channels whose gate is on, 0 on the others (NaN or Inf there included);
// dst may be src. Both are laid out like src, NCHW or channels_last.
template <typename scalar_t, Activation A>
void gate_channels(const at::Tensor& src, at::Tensor& dst, const at::Tensor& gates, int64_t G) {
  const int64_t N = src.size(0), C = src.size(1), HW = src.size(2) * src.size(3);
  const bool nhwc = feature_layout(src) == at::MemoryFormat::ChannelsLast;
  const scalar_t* in = src.data_ptr<scalar_t>();
  scalar_t* out = dst.data_ptr<scalar_t>();
  const bool* on = gates.data_ptr<bool>();
  const int64_t ngates = C / G;
  if (!nhwc) {  // one plane per channel: copied or zeroed whole
    at::parallel_for(0, N * C, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, HW)), [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc) {
        const scalar_t* plane = in + nc * HW;
        scalar_t* to = out + nc * HW;
        if (on[(nc / C) * ngates + (nc % C) / G])
          for (int64_t t = 0; t < HW; ++t) to[t] = activate<A>(plane[t]);
        else
          std::fill(to, to + HW, scalar_t(0));
      }
    });
    return;
  }
  at::parallel_for(0, N * HW, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, C)), [&](int64_t b, int64_t e) {
    std::vector<scalar_t> keep(C);
    int64_t n = -1;
    for (int64_t px = b; px < e; ++px) {
      if (px / HW != n) {
        n = px / HW;
        for (int64_t c = 0; c < C; ++c) keep[c] = on[n * ngates + c / G] ? scalar_t(1) : scalar_t(0);
      }
      const scalar_t* from = in + px * C;
      scalar_t* to = out + px * C;
      if constexpr (std::is_same_v<scalar_t, float>) {
        cpu::gate_floats(to, from, keep.data(), C, A == Activation::kRelu);
      } else {  // a select, not a product: 0 * NaN would be NaN
        for (int64_t c = 0; c < C; ++c) to[c] = keep[c] != scalar_t(0) ? activate<A>(from[c]) : scalar_t(0);
      }
    }
  });
}

at::Tensor dense_grouped_then_mask(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& in_gates,
                                   const c10::optional<at::Tensor>& out_gates, Activation act) {
  const at::MemoryFormat layout = feature_layout(x);
  at::Tensor src = x.contiguous(layout);
  if (in_gates.has_value()) {
    at::Tensor gated = at::empty_like(src, src.options().memory_format(layout));
    AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "channel_gated_conv2d_cpu", [&] {
      gate_channels<scalar_t, Activation::kNone>(src, gated, in_gates->contiguous(), g.G);
    });
    src = gated;
  }
  at::Tensor y = at::convolution(src, weight, bias, {g.SH, g.SW}, {g.PH, g.PW}, {g.DH, g.DW},
                                 /*transposed=*/false, /*output_padding=*/{0, 0}, g.groups)
                     .contiguous(layout);
  if (out_gates.has_value()) {
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "channel_gated_conv2d_cpu", [&] {
      with_activation(act, [&](auto A) {
        gate_channels<scalar_t, decltype(A)::value>(y, y, out_gates->contiguous(), g.G);
      });
    });
  } else if (act == Activation::kRelu) {
    y.relu_();
  }
  return y;
}

at::Tensor channel_gated_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias,
                                    const c10::optional<at::Tensor>& in_gates,
                                    const c10::optional<at::Tensor>& out_gates, int64_t group_size,
                                    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                    int64_t groups, c10::string_view activation) {
  const char* op = "channel_gated_conv2d";
  const ConvGeometry g = check_channel_conv_args(x, weight, bias, in_gates, out_gates, group_size, stride, padding,
                                                 dilation, groups, op);
  const Activation act = parse_activation(activation, op);
  if (g.N * g.Cout * g.Ho * g.Wo != 0 && dense_grouped_is_faster(g, x))
    return dense_grouped_then_mask(g, x, weight, bias, in_gates, out_gates, act);
  at::Tensor y = at::empty({g.N, g.Cout, g.Ho, g.Wo}, x.options().memory_format(feature_layout(x)));
  if (y.numel() == 0) return y;
  run_channel_conv(g, x, weight, bias, in_gates, out_gates, act, y, /*accumulate=*/false);
  return y;
}

void channel_gated_conv2d_add_cpu(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& in_gates,
                                  const c10::optional<at::Tensor>& out_gates, int64_t group_size,
                                  c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                  int64_t groups, c10::string_view activation, const c10::optional<at::Tensor>& means) {
  const char* op = "channel_gated_conv2d_add_";
  const ConvGeometry g = check_channel_add_args(residual, x, weight, bias, in_gates, out_gates, group_size, stride,
                                                padding, dilation, groups, means, op);
  const Activation act = parse_activation(activation, op);
  if (residual.numel() == 0) {
    if (means.has_value()) means->fill_(std::numeric_limits<double>::quiet_NaN());  // torch.mean of nothing
    return;
  }
  // The kernel walks the residual in x's layout; other strides get a working copy, written back once.
  const at::MemoryFormat layout = feature_layout(x);
  at::Tensor work = residual.is_contiguous(layout) ? residual : residual.contiguous(layout);
  at::Tensor sums_out;
  if (means.has_value()) sums_out = means->is_contiguous() ? *means : at::empty_like(*means, at::MemoryFormat::Contiguous);
  run_channel_conv(g, x, weight, bias, in_gates, out_gates, act, work, /*accumulate=*/true, sums_out);
  if (!work.is_same(residual)) residual.copy_(work);
  if (means.has_value() && !sums_out.is_same(*means)) means->copy_(sums_out);
}

}  // namespace

TORCH_LIBRARY_IMPL(laudnet_ops, CPU, m) {
  m.impl("channel_gated_conv2d", &channel_gated_conv2d_cpu);
  m.impl("channel_gated_conv2d_add_", &channel_gated_conv2d_add_cpu);
}

}  // namespace laudnet_ops

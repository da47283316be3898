// One gathered implicit-GEMM kernel on tensor cores (CuTe, SM80 mma.sync, runs on Hopper too):
//
//     D[z][m, n] = epilogue(sum_k A[z][m, k] * B[z][n, k])    (fp32 accumulation)
//
// RUN ON AN NVIDIA H200 (sm_90): correct there (tests/test_tensor_cores.py), but at 4-10% of the
// roofline (benchmarks/results/gpu-NVIDIA-H200-*.md); never run on sm_80 hardware. Why it is slow,
// from Nsight Compute and the SASS: 250 registers a thread hold it at 2 blocks (8 warps) per SM, and
// the warps are issue-bound, not tensor-bound -- a k-tile's 64 HMMAs come with ~390 instructions of
// index math and predicates, and the epilogue spends ~110 instructions per accumulator (the store
// redoes the row's position, with integer divisions, for each of its 128 values). With the
// experimental switch on, the epilogue goes row by row instead (store_by_rows): a thread's 128
// accumulators lie on 8 rows, so the row's part is done 8 times, not 128; and each thread's k state
// (tap, channel, list position) steps from k-tile to k-tile (step_k_a / step_k_b) instead of being
// divided out of the k index again. EXPERIMENTAL: the CPU emulation runs both the same way and
// passes, but they have not run on a GPU (benchmarks/results/gpu.md).
//
// Neither A nor B is materialised. A Problem (one per op, see the other files here) maps a row m
// and a 16-byte k-vector kv (8 half/bf16 values, k = 8 kv .. 8 kv + 7) to a source address or to
// "zero" (nullptr): the convolution's halo, padding and gate gathers all live in that mapping.
// Loads are cp.async (16 bytes, zero-filled when predicated off) into a multi-stage shared-memory
// pipeline with a swizzled layout; ldmatrix moves tiles to registers; the epilogue hands each
// accumulator with its (m, n) to the Problem. One tile configuration (128 x 128 x 32, 4 warps,
// 4 stages) keeps the number of template instantiations -- and the build time -- small.
//
// Problem interface (all CUTE_HOST_DEVICE, so emulate_gather_gemm can run the same index math on the
// CPU for the tests; z = blockIdx.z):
//   int64_t rows(z); int cols(z);        D's extent; cols are the columns the epilogue stores
//   int active_cols(z);                  columns [active_cols, cols) have B = 0 (no loads, no MMA)
//   int kvecs(z);                        K / 8
//   RowA row_a(z, m); KA k_a(z, kv); const Elem* a_src(RowA, KA)     (m < rows(z) guaranteed)
//   RowB row_b(z, n); KB k_b(z, kv); const Elem* b_src(RowB, KB)     (n < active_cols(z))
//   const Elem* any_src();               a valid address for zero-filled loads (never read)
//   RowOut row_out(z, m); void store_row(RowOut, z, n, float acc)    m < rows(z), n < cols(z): the
//                                        store of one value, its row's part (position, cell) apart
//                                        so that the row-by-row epilogue does it once per row
//   void step_k_a(z, KA&); void step_k_b(z, KB&)    k_a(z, kv) -> k_a(z, kv + kVecsPerRow), without
//                                        reading past the Problem's tensors (stepping past the end
//                                        is allowed; such a state is never used)
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cute/tensor.hpp>

#include "../../tensor_core_switch.h"

#include <cstdint>
#include <limits>

namespace laudnet_ops {
namespace tc {

constexpr int kBM = 128;     // rows per block tile
constexpr int kBN = 128;     // columns per block tile
constexpr int kBK = 32;      // k per pipeline stage: 4 vectors of 8
constexpr int kVec = 8;      // elements per 16-byte vector
constexpr int kStages = 4;   // shared-memory pipeline depth
constexpr int kThreads = 128;
constexpr int kVecsPerRow = kBK / kVec;             // 4
constexpr int kRowsPerPass = kThreads / kVecsPerRow;  // 32 rows loaded per pass of the block
constexpr int kPassesA = kBM / kRowsPerPass;        // 4
constexpr int kPassesB = kBN / kRowsPerPass;        // 4

template <class Elem>
struct MmaAtomFor;
template <>
struct MmaAtomFor<cute::half_t> {
  using type = cute::SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct MmaAtomFor<cute::bfloat16_t> {
  using type = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};

template <class Elem>
struct GemmConfig {
  // 8 rows x 32 k, with the 16-byte chunks of a row XOR-swizzled by the row so that ldmatrix's
  // eight row reads hit distinct banks. The swizzle moves whole 16-byte chunks, so one cp.async
  // vector stays contiguous.
  using SmemAtom = decltype(cute::composition(cute::Swizzle<2, 3, 3>{},
                                              cute::Layout<cute::Shape<cute::_8, cute::Int<kBK>>,
                                                           cute::Stride<cute::Int<kBK>, cute::_1>>{}));
  using SmemLayoutA = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBM>, cute::Int<kBK>, cute::Int<kStages>>{}));
  using SmemLayoutB = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBN>, cute::Int<kBK>, cute::Int<kStages>>{}));
  // 2 x 2 warps; the 32 x 32 x 16 permutation lets one ldmatrix.x4 feed each operand.
  using TiledMma = decltype(cute::make_tiled_mma(typename MmaAtomFor<Elem>::type{},
                                                 cute::Layout<cute::Shape<cute::_2, cute::_2, cute::_1>>{},
                                                 cute::Tile<cute::_32, cute::_32, cute::_16>{}));
  using S2RAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Elem>;
  static constexpr int kSmemElemsA = cute::cosize_v<SmemLayoutA>;
  static constexpr int kSmemElemsB = cute::cosize_v<SmemLayoutB>;
  static constexpr size_t kSmemBytes = size_t(kSmemElemsA + kSmemElemsB) * sizeof(Elem);
};

// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 writes zeros without reading src.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#else
  __trap();  // the host side never launches on devices below sm_80
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// The (m, n) inside the block tile of each accumulator of thread tid. The C fragment of the
// SM80 16x8x16 atoms is the same for float16 and bfloat16 (fp32 accumulators), so the emulation,
// whose Problems hold float, uses the float16 layout too.
CUTE_HOST_DEVICE auto tile_coords(int tid) {
  using namespace cute;
  typename GemmConfig<cute::half_t>::TiledMma mma;
  return mma.get_slice(tid).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
}

// Thread tid's accumulators of the tile at (m0, n0), row by row: the Problem's row part once
// (row_out), then each of the row's columns (store_row). A fragment coordinate ((c, h), mi, ni) is
// column pair element c, row half h, of atom (mi, ni): for fixed (h, mi) every c and ni share one
// row. value(coord) is that accumulator. The CPU emulation runs this same loop with the dot products
// as values, so a wrong grouping stores some row's values into another and fails its tests.
template <class Problem, class Value>
CUTE_HOST_DEVICE void store_by_rows(const Problem& p, int z, int64_t m0, int n0, int64_t rows, int cols, int tid,
                                    const Value& value) {
  using namespace cute;
  const auto coords = tile_coords(tid);
  CUTE_UNROLL
  for (int mi = 0; mi < size<1>(coords); ++mi) {
    CUTE_UNROLL
    for (int h = 0; h < size<0, 1>(coords); ++h) {
      const int64_t m = m0 + get<0>(coords(make_coord(make_coord(0, h), mi, 0)));
      if (m >= rows) continue;
      const auto row = p.row_out(z, m);
      CUTE_UNROLL
      for (int ni = 0; ni < size<2>(coords); ++ni) {
        CUTE_UNROLL
        for (int c = 0; c < size<0, 0>(coords); ++c) {
          const auto at = make_coord(make_coord(c, h), mi, ni);
          const int n = n0 + static_cast<int>(get<1>(coords(at)));
          if (n < cols) p.store_row(row, z, n, value(at));
        }
      }
    }
  }
}

// Grid: x = (row tile, column tile) with the column tile fastest, z = batch (sample); the grid is
// sized for the largest z, so blocks past a smaller z's rows or columns return at once.
template <class Problem>
__global__ void __launch_bounds__(kThreads)
    gather_gemm_kernel(const Problem p, const int col_tiles, const bool experimental) {
  using namespace cute;
  using Elem = typename Problem::Elem;
  using Cfg = GemmConfig<Elem>;

  const int z = blockIdx.z;
  // Column tiles of one row tile are neighbours in launch order, so they share A through L2.
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / col_tiles) * kBM;
  const int n0 = static_cast<int>(blockIdx.x % col_tiles) * kBN;
  const int64_t rows = p.rows(z);
  const int cols = p.cols(z);
  if (m0 >= rows || n0 >= cols) return;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Elem* smem_a = reinterpret_cast<Elem*>(smem_raw);
  Elem* smem_b = smem_a + Cfg::kSmemElemsA;
  Tensor sA = make_tensor(make_smem_ptr(smem_a), typename Cfg::SmemLayoutA{});  // (BM, BK, stage)
  Tensor sB = make_tensor(make_smem_ptr(smem_b), typename Cfg::SmemLayoutB{});  // (BN, BK, stage)

  typename Cfg::TiledMma mma;
  ThrMMA thr_mma = mma.get_slice(threadIdx.x);
  Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});  // (MMA, MMA_M, MMA_N) fp32
  clear(acc);

  const int active = p.active_cols(z);
  if (n0 < active) {
    // Each thread loads one k-vector column of kPassesA rows of A and kPassesB rows of B per stage;
    // the rows are fixed for the whole K loop, so their gather state is computed once.
    const int vcol = threadIdx.x % kVecsPerRow;
    const int row0 = threadIdx.x / kVecsPerRow;
    typename Problem::RowA row_a[kPassesA];
    bool row_a_ok[kPassesA];
    CUTE_UNROLL
    for (int i = 0; i < kPassesA; ++i) {
      const int64_t m = m0 + row0 + i * kRowsPerPass;
      row_a_ok[i] = m < rows;
      row_a[i] = p.row_a(z, row_a_ok[i] ? m : m0);
    }
    typename Problem::RowB row_b[kPassesB];
    bool row_b_ok[kPassesB];
    CUTE_UNROLL
    for (int i = 0; i < kPassesB; ++i) {
      const int n = n0 + row0 + i * kRowsPerPass;
      row_b_ok[i] = n < active;
      row_b[i] = p.row_b(z, row_b_ok[i] ? n : n0);
    }
    const Elem* zero_src = p.any_src();
    const int kvecs = p.kvecs(z);
    const int k_tiles = (kvecs + kVecsPerRow - 1) / kVecsPerRow;
    // Experimental: this thread's k state, stepped once per stage load (the loads come in k-tile
    // order). k_a / k_b may only be asked for a k vector that exists.
    typename Problem::KA ka_next{};
    typename Problem::KB kb_next{};
    if (kvecs > 0) {
      ka_next = p.k_a(z, vcol < kvecs ? vcol : 0);
      kb_next = p.k_b(z, vcol < kvecs ? vcol : 0);
    }

    auto load_stage = [&](int k_tile, int stage) {
      const int kv = k_tile * kVecsPerRow + vcol;
      const bool kv_ok = kv < kvecs;
      const auto ka = experimental ? ka_next : p.k_a(z, kv_ok ? kv : 0);
      const auto kb = experimental ? kb_next : p.k_b(z, kv_ok ? kv : 0);
      if (experimental && kv_ok) {
        p.step_k_a(z, ka_next);
        p.step_k_b(z, kb_next);
      }
      CUTE_UNROLL
      for (int i = 0; i < kPassesA; ++i) {
        const Elem* src = kv_ok && row_a_ok[i] ? p.a_src(row_a[i], ka) : nullptr;
        const int offset = typename Cfg::SmemLayoutA{}(row0 + i * kRowsPerPass, vcol * kVec, stage);
        cp_async_16(smem_a + offset, src != nullptr ? src : zero_src, src != nullptr);
      }
      CUTE_UNROLL
      for (int i = 0; i < kPassesB; ++i) {
        const Elem* src = kv_ok && row_b_ok[i] ? p.b_src(row_b[i], kb) : nullptr;
        const int offset = typename Cfg::SmemLayoutB{}(row0 + i * kRowsPerPass, vcol * kVec, stage);
        cp_async_16(smem_b + offset, src != nullptr ? src : zero_src, src != nullptr);
      }
    };

    // Register fragments and their ldmatrix views.
    Tensor tCrA = thr_mma.partition_fragment_A(sA(_, _, 0));  // (MMA, MMA_M, MMA_K)
    Tensor tCrB = thr_mma.partition_fragment_B(sB(_, _, 0));  // (MMA, MMA_N, MMA_K)
    auto s2r_a = make_tiled_copy_A(typename Cfg::S2RAtom{}, mma);
    auto s2r_thr_a = s2r_a.get_slice(threadIdx.x);
    Tensor tXsA = s2r_thr_a.partition_S(sA);  // (CPY, MMA_M, MMA_K, stage)
    Tensor tXrA = s2r_thr_a.retile_D(tCrA);
    auto s2r_b = make_tiled_copy_B(typename Cfg::S2RAtom{}, mma);
    auto s2r_thr_b = s2r_b.get_slice(threadIdx.x);
    Tensor tXsB = s2r_thr_b.partition_S(sB);  // (CPY, MMA_N, MMA_K, stage)
    Tensor tXrB = s2r_thr_b.retile_D(tCrB);

    // Prologue: stages 0 .. kStages-2 in flight (one commit group each, empty past the end).
    CUTE_UNROLL
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) load_stage(s, s);
      cp_async_commit();
    }
    for (int k_tile = 0; k_tile < k_tiles; ++k_tile) {
      // Tile k_tile has landed once at most kStages-2 younger groups are pending; the barrier also
      // guarantees every warp is done with the stage that the next load overwrites.
      cp_async_wait<kStages - 2>();
      __syncthreads();
      const int next = k_tile + kStages - 1;
      if (next < k_tiles) load_stage(next, next % kStages);
      cp_async_commit();
      const int stage = k_tile % kStages;
      CUTE_UNROLL
      for (int kb = 0; kb < size<2>(tCrA); ++kb) {
        copy(s2r_a, tXsA(_, _, kb, stage), tXrA(_, _, kb));
        copy(s2r_b, tXsB(_, _, kb, stage), tXrB(_, _, kb));
        gemm(mma, tCrA(_, _, kb), tCrB(_, _, kb), acc);
      }
    }
    cp_async_wait<0>();
  }

  if (experimental) {
    store_by_rows(p, z, m0, n0, rows, cols, threadIdx.x, [&](const auto& at) { return acc(at); });
    return;
  }
  // Epilogue: the identity tensor gives each accumulator its (m, n) inside the tile.
  Tensor coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    const int64_t m = m0 + get<0>(coords(i));
    const int n = n0 + get<1>(coords(i));
    if (m < rows && n < cols) p.store_row(p.row_out(z, m), z, n, acc(i));
  }
}

// Grid and launch for a Problem whose largest z has max_rows rows and max_cols columns.
template <class Problem>
void launch_gather_gemm(const Problem& p, int64_t max_rows, int64_t max_cols, int64_t zs, cudaStream_t stream) {
  using Cfg = GemmConfig<typename Problem::Elem>;
  const int64_t row_tiles = (max_rows + kBM - 1) / kBM;
  const int64_t col_tiles = (max_cols + kBN - 1) / kBN;
  if (row_tiles == 0 || col_tiles == 0 || zs == 0) return;
  TORCH_CHECK(row_tiles * col_tiles <= std::numeric_limits<int32_t>::max() && zs <= 65535,
              "laudnet_ops tensor-core GEMM: problem too large (", max_rows, " rows, ", max_cols, " columns, ", zs,
              " batches)");
  auto kernel = gather_gemm_kernel<Problem>;
  // Above 48 KiB of dynamic shared memory a kernel must opt in.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Cfg::kSmemBytes)));
  kernel<<<dim3(static_cast<unsigned>(row_tiles * col_tiles), 1, static_cast<unsigned>(zs)), kThreads,
           Cfg::kSmemBytes, stream>>>(p, static_cast<int>(col_tiles), experimental_kernels_enabled());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One output of the GEMM on the host, as the experimental kernel computes it: each of a row's
// kVecsPerRow loader threads starts at its own k vector and steps its k state from there;
// zero-filled vectors add nothing, columns from active_cols on are zero.
template <class Problem>
float emulated_dot(const Problem& p, int z, int64_t m, int n) {
  if (n >= p.active_cols(z)) return 0.f;
  const auto ra = p.row_a(z, m);
  const auto rb = p.row_b(z, n);
  const int kvecs = p.kvecs(z);
  float acc = 0.f;
  for (int vcol = 0; vcol < kVecsPerRow && vcol < kvecs; ++vcol) {
    auto ka = p.k_a(z, vcol);
    auto kb = p.k_b(z, vcol);
    for (int kv = vcol; kv < kvecs; kv += kVecsPerRow) {
      const auto* a = p.a_src(ra, ka);
      const auto* b = p.b_src(rb, kb);
      p.step_k_a(z, ka);
      p.step_k_b(z, kb);
      if (a == nullptr || b == nullptr) continue;
      for (int e = 0; e < kVec; ++e) acc += float(a[e]) * float(b[e]);
    }
  }
  return acc;
}

// The kernel's arithmetic, one output at a time on the host: the same Problem (instantiated with
// Elem = float) decides every address, every zero and every store. Tests compare it with the
// reference to validate the gather and epilogue index math without a GPU. With the experimental
// switch on it steps the k state and stores through the row-by-row epilogue, walking the grid's
// tiles and every thread of a block as the kernel does.
template <class Problem>
void emulate_gather_gemm(const Problem& p, int64_t zs) {
  if (experimental_kernels_enabled()) {
    for (int z = 0; z < zs; ++z) {
      const int64_t rows = p.rows(z);
      const int cols = p.cols(z);
      for (int64_t m0 = 0; m0 < rows; m0 += kBM) {
        for (int n0 = 0; n0 < cols; n0 += kBN) {
          for (int tid = 0; tid < kThreads; ++tid) {
            const auto coords = tile_coords(tid);
            store_by_rows(p, z, m0, n0, rows, cols, tid, [&](const auto& at) {
              return emulated_dot(p, z, m0 + cute::get<0>(coords(at)), n0 + static_cast<int>(cute::get<1>(coords(at))));
            });
          }
        }
      }
    }
    return;
  }
  for (int z = 0; z < zs; ++z) {
    const int64_t rows = p.rows(z);
    const int cols = p.cols(z), active = p.active_cols(z), kvecs = p.kvecs(z);
    for (int64_t m = 0; m < rows; ++m) {
      const auto ra = p.row_a(z, m);
      const auto out = p.row_out(z, m);
      for (int n = 0; n < cols; ++n) {
        float acc = 0.f;
        if (n < active) {
          const auto rb = p.row_b(z, n);
          for (int kv = 0; kv < kvecs; ++kv) {
            const auto* a = p.a_src(ra, p.k_a(z, kv));
            const auto* b = p.b_src(rb, p.k_b(z, kv));
            if (a == nullptr || b == nullptr) continue;  // the kernel's zero-filled vectors
            for (int e = 0; e < kVec; ++e) acc += float(a[e]) * float(b[e]);
          }
        }
        p.store_row(out, z, n, acc);
      }
    }
  }
}

}  // namespace tc
}  // namespace laudnet_ops

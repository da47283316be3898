// Row-major GEMM on raw pointers for the CPU kernels: C = A . B with
// C (M x N, ld_c), A (M x K, ld_a), B (K x N, ld_b).
//
// float goes to ATen's batch-reduce GEMM micro-kernel (cpublas::brgemm: the
// oneDNN ukernel that its own convolutions are built from, with a BLAS
// fallback inside ATen where the ukernel is unavailable), in 64 x 64 blocks.
// Measured on this project's 2-core AVX-512 machine, interleaved in one
// process, for the 1x1-conv shape (12544 x 512) . (512 x 128): MKL sgemm via
// at::mm 33.1 ms, brgemm 24.0 ms, oneDNN's own 1x1 convolution 24.1 ms
// (medians of 15; the machine was shared). Other dtypes use at::mm_out.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/version.h>

#include <algorithm>
#include <type_traits>

// The float32 micro-kernel entry point (with its is_vnni argument) is not in the
// oldest torch releases this project supports; those take the at::mm path.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define LAUDNET_OPS_HAVE_BRGEMM 1
#else
#define LAUDNET_OPS_HAVE_BRGEMM 0
#endif

namespace laudnet_ops {
namespace cpu {

constexpr int64_t kGemmBlockM = 64;
constexpr int64_t kGemmBlockN = 64;
// Reductions longer than this are cut into equal blocks of at most this many: a 64-row block of A
// and a 64-column panel of B over the whole of a long K (3x3 over 256+ channels, 1x1 over 2048) no
// longer fit L2 together. Shorter ones are not cut: each block costs one more pass over C.
constexpr int64_t kGemmBlockK = 1024;

// The length of each of the equal blocks a reduction of K > 0 is cut into.
inline int64_t reduction_block(int64_t K) {
  const int64_t k_blocks = (K + kGemmBlockK - 1) / kGemmBlockK;
  return (K + k_blocks - 1) / k_blocks;
}

// accumulate: C += A . B instead of C = A . B.
template <typename scalar_t>
void gemm_rowmajor(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t ld_a, const scalar_t* B,
                   int64_t ld_b, scalar_t* C, int64_t ld_c, bool accumulate = false) {
  if (M == 0 || N == 0) return;
#if LAUDNET_OPS_HAVE_BRGEMM
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (K > 0) {
      const int64_t block_k = reduction_block(K);
      for (int64_t m0 = 0; m0 < M; m0 += kGemmBlockM) {
        for (int64_t n0 = 0; n0 < N; n0 += kGemmBlockN) {
          for (int64_t k0 = 0; k0 < K; k0 += block_k) {
            at::native::cpublas::brgemm(std::min(kGemmBlockM, M - m0), std::min(kGemmBlockN, N - n0),
                                        std::min(block_k, K - k0), ld_a, ld_b, ld_c,
                                        /*add_C=*/accumulate || k0 > 0, A + m0 * ld_a + k0, B + k0 * ld_b + n0,
                                        C + m0 * ld_c + n0, /*is_vnni=*/false);
          }
        }
      }
      return;
    }
  }
#endif
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const at::Tensor a = at::from_blob(const_cast<scalar_t*>(A), {M, K}, {ld_a, 1}, opts);
  const at::Tensor b = at::from_blob(const_cast<scalar_t*>(B), {K, N}, {ld_b, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ld_c, 1}, opts);
  if (accumulate)
    c.addmm_(a, b);
  else
    at::mm_out(c, a, b);
}

// Whether products of this type are computed block by block of kGemmBlockM
// rows (the micro-kernel path); the at::mm path has a per-call cost that
// 64-row calls would multiply.
template <typename scalar_t>
constexpr bool kGemmRowBlocks = LAUDNET_OPS_HAVE_BRGEMM && std::is_same_v<scalar_t, float>;

// The same product, handing each block of at most kGemmBlockM finished rows of C
// to epilogue(row0, rows) while they are still in L1: bias, activation or a
// scatter then cost no second pass over C from memory. accumulate as in gemm_rowmajor.
template <typename scalar_t, typename Epilogue>
void gemm_rowmajor_rows(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t ld_a, const scalar_t* B,
                        int64_t ld_b, scalar_t* C, int64_t ld_c, const Epilogue& epilogue, bool accumulate = false) {
  constexpr bool kBlockwise = kGemmRowBlocks<scalar_t>;
  if (!kBlockwise) gemm_rowmajor(M, N, K, A, ld_a, B, ld_b, C, ld_c, accumulate);
  for (int64_t m0 = 0; m0 < M; m0 += kGemmBlockM) {
    const int64_t rows = std::min(kGemmBlockM, M - m0);
    if (kBlockwise) gemm_rowmajor(rows, N, K, A + m0 * ld_a, ld_a, B, ld_b, C + m0 * ld_c, ld_c, accumulate);
    epilogue(m0, rows);
  }
}

// Releases the micro-kernel's per-thread hardware state; call at the end of a task.
template <typename scalar_t>
void gemm_release() {
#if LAUDNET_OPS_HAVE_BRGEMM
  if constexpr (std::is_same_v<scalar_t, float>) at::native::cpublas::brgemm_release(/*is_vnni=*/false);
#endif
}

// C = A . B on all threads, for a long reduction over a few hundred rows (a 3x3 conv over 512
// channels on the kept pixels of a 7x7 or 14x14 map). Each task owns whole 64-column panels of C
// and walks them K block by K block, every row block inside: the panel's K block of B (at most
// kGemmBlockK x 64) stays in L2 while the rows of A stream past it, so B is read from memory once
// in all and A once per panel. In gather_conv2d, 3x3 over 512 channels on half of a 7x7 map at
// batch 8 (202 x 4608 x 512), three runs each in one process: 4.5-4.9 ms, against 5.3-5.4 ms for
// at::mm (MKL), which splits the few rows between the threads. Other dtypes use at::mm_out. Not
// for use inside a parallel region.
template <typename scalar_t>
void gemm_rowmajor_panels(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t ld_a, const scalar_t* B,
                          int64_t ld_b, scalar_t* C, int64_t ld_c) {
  if (!kGemmRowBlocks<scalar_t> || M == 0 || N == 0 || K == 0)
    return gemm_rowmajor(M, N, K, A, ld_a, B, ld_b, C, ld_c);
  const int64_t panels = (N + kGemmBlockN - 1) / kGemmBlockN;
  // Fewer panels than twice the threads: the rows are cut too, so that every core has work.
  const int64_t threads = at::get_num_threads();
  const int64_t row_parts =
      std::clamp<int64_t>((2 * threads + panels - 1) / panels, 1, (M + kGemmBlockM - 1) / kGemmBlockM);
  const int64_t part_rows = ((M + row_parts - 1) / row_parts + kGemmBlockM - 1) / kGemmBlockM * kGemmBlockM;
  const int64_t block_k = reduction_block(K);
  at::parallel_for(0, panels * row_parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = (task / row_parts) * kGemmBlockN, nb = std::min(kGemmBlockN, N - n0);
      const int64_t m_begin = (task % row_parts) * part_rows, m_end = std::min(M, m_begin + part_rows);
      for (int64_t k0 = 0; k0 < K; k0 += block_k) {
        for (int64_t m0 = m_begin; m0 < m_end; m0 += kGemmBlockM) {  // each one micro-kernel call
          gemm_rowmajor(std::min(kGemmBlockM, m_end - m0), nb, std::min(block_k, K - k0), A + m0 * ld_a + k0, ld_a,
                        B + k0 * ld_b + n0, ld_b, C + m0 * ld_c + n0, ld_c, /*accumulate=*/k0 > 0);
        }
      }
    }
    gemm_release<scalar_t>();
  });
}

}  // namespace cpu
}  // namespace laudnet_ops

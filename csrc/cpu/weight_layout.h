// The weight operand of the channels_last CPU convolutions: per convolution
// group, a (KH*KW*Cin_g, Cout_g) row-major matrix whose rows run in (ky, kx, ci)
// order, the order in which those kernels pack an output pixel's inputs.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>

namespace laudnet_ops {
namespace cpu {

// (groups, KH*KW*Cin_g, Cout_g) from a (Cout, Cin_g, KH, KW) weight: the weight
// itself, viewed, when it already lies that way (the dynamic blocks keep their
// folded weights so), else a copy made on all threads. Each task takes 16
// output channels of a group, whose source rows stay in cache while every tap
// and input channel of them is written, a cache line per destination row. That
// runs at about the memory's copy rate (1.3-1.6 ms for a 512x512x3x3 weight on 2
// threads); a strided TensorIterator copy of it took 3.9 ms.
inline at::Tensor taps_major_weight(const at::Tensor& weight, int64_t groups) {
  const int64_t Cout = weight.size(0), Cin_g = weight.size(1), KH = weight.size(2), KW = weight.size(3);
  const int64_t Cout_g = Cout / groups, rows = KH * KW * Cin_g;
  const at::Tensor src = weight.view({groups, Cout_g, Cin_g, KH, KW});
  const at::Tensor laid = src.permute({0, 3, 4, 2, 1});
  if (laid.is_contiguous()) return laid.view({groups, rows, Cout_g});
  at::Tensor out = at::empty({groups, rows, Cout_g}, weight.options());
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (Cout_g + kBlock - 1) / kBlock;
  const int64_t s_g = src.stride(0), s_co = src.stride(1), s_ci = src.stride(2), s_ky = src.stride(3),
                s_kx = src.stride(4);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "taps_major_weight", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, groups * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        const int64_t grp = job / blocks, co0 = (job % blocks) * kBlock;
        const int64_t n = std::min(kBlock, Cout_g - co0);
        const scalar_t* base = in + grp * s_g + co0 * s_co;
        scalar_t* dst = o + grp * rows * Cout_g + co0;
        for (int64_t ky = 0; ky < KH; ++ky)
          for (int64_t kx = 0; kx < KW; ++kx)
            for (int64_t ci = 0; ci < Cin_g; ++ci, dst += Cout_g) {
              const scalar_t* s = base + ci * s_ci + ky * s_ky + kx * s_kx;
              for (int64_t c = 0; c < n; ++c) dst[c] = s[c * s_co];
            }
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace laudnet_ops

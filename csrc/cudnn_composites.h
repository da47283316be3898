// The runtime switch that sends every CUDA call of the four convolution ops through its cuDNN
// composite -- gather_conv2d as halo tiles (gather_conv2d_tiles.cpp), masker_conv1x1 and both
// conv1x1_scatter_add ops as dense 1x1 convolutions (conv1x1_composites.cpp), channel_gated_conv2d
// as one grouped convolution over (sample, conv group) pairs (channel_gated_sample_groups.cpp) --
// the calls the tensor-core kernels take included.
//
// Why: on the H200 the tensor-core kernels ran at 4-10% of their roofline, slower than cuDNN's dense
// convolution of the same map; the composites spend cuDNN's speed on the kept work only. Which wins
// is a measurement, and this switch lets one GPU run time whole blocks both ways without a rebuild.
// EXPERIMENTAL like the composites themselves (not yet run on a GPU): off by default;
// LAUDNET_OPS_CUDNN_COMPOSITES=1 at import, or laudnet_ops.set_cudnn_composites(True).
#pragma once

namespace laudnet_ops {

bool cudnn_composites_enabled();
void set_cudnn_composites(bool on);

}  // namespace laudnet_ops

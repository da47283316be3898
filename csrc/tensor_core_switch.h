// The runtime switch of the tensor-core (CUTLASS/CuTe) CUDA kernels.
//
// The switch lives in a plain C++ file, compiled in every build (CPU-only
// included), so the Python API (laudnet_ops.set_tensor_cores & co., exposed by
// module.cpp) exists whatever was built. The tensor-core kernels mark
// themselves built when their shared library is loaded.
#pragma once

#include <cstdint>

namespace laudnet_ops {

// Whether this extension carries the tensor-core kernels (CUDA and CUTLASS at build time).
bool tensor_cores_built();
// Whether eligible calls take the tensor-core kernels (default: on where built).
bool tensor_cores_enabled();
// Turns the switch; turning it on in a build without the kernels throws, naming why.
void set_tensor_cores(bool on);
// Called once by the tensor-core kernels' translation unit at load time; turns the switch on.
void mark_tensor_cores_built();
// Counts the calls that ran on tensor cores, so tests can tell which path a call took.
void count_tensor_core_call();
int64_t tensor_core_calls();

// Whether CUDA paths that compile and pass the CPU-side tests but have not yet run on a GPU are taken
// (default off; LAUDNET_OPS_EXPERIMENTAL=1 at import, or laudnet_ops.set_experimental_kernels). Each
// such path names itself "experimental" where it checks this; a GPU run that validates it makes it
// the default and drops the check.
bool experimental_kernels_enabled();
void set_experimental_kernels(bool on);

}  // namespace laudnet_ops

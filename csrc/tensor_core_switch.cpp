// State of the runtime switches -- tensor cores, experimental paths (tensor_core_switch.h), cuDNN
// composites (cudnn_composites.h) -- and the schema of
// the internal op that lets tests reach the fused 1x1-conv + scatter-add
// tensor-core epilogue before its public op is wired to it.
#include "tensor_core_switch.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>

#include "cudnn_composites.h"

namespace laudnet_ops {
namespace {

std::atomic<bool>& built_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

}  // namespace

bool tensor_cores_built() { return built_flag().load(); }

bool tensor_cores_enabled() { return enabled_flag().load(); }

void set_tensor_cores(bool on) {
  TORCH_CHECK(!on || tensor_cores_built(),
              "laudnet_ops: the tensor-core kernels were not built into this extension (they need a CUDA build "
              "and the CUTLASS headers at build time: pip install --no-deps nvidia-cutlass, or set "
              "LAUDNET_OPS_CUTLASS_DIR, then rebuild)");
  enabled_flag().store(on);
}

// Built means on: the kernels passed their GPU validation (see tensor_core.h).
void mark_tensor_cores_built() {
  built_flag().store(true);
  enabled_flag().store(true);
}

namespace {
std::atomic<int64_t>& call_counter() {
  static std::atomic<int64_t> count{0};
  return count;
}
}  // namespace

void count_tensor_core_call() { call_counter().fetch_add(1); }

int64_t tensor_core_calls() { return call_counter().load(); }

namespace {
std::atomic<bool>& experimental_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}
}  // namespace

bool experimental_kernels_enabled() { return experimental_flag().load(); }

void set_experimental_kernels(bool on) { experimental_flag().store(on); }

namespace {
std::atomic<bool>& composites_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}
}  // namespace

bool cudnn_composites_enabled() { return composites_flag().load(); }

void set_cudnn_composites(bool on) { composites_flag().store(on); }

TORCH_LIBRARY_FRAGMENT(laudnet_ops, m) {
  // Returns whether the tensor-core kernel ran (false: ineligible, switched off, or not built).
  m.def("_tensor_core_conv1x1_scatter_add_(Tensor(a!) out, Tensor packed, Tensor indices, Tensor weight, "
        "Tensor? bias, str activation) -> bool");
  // CPU emulations of the tensor-core kernels (float32): the kernels' gather and epilogue index math
  // run on the host, so tests validate it without a GPU. Built with the tensor-core kernels only.
  m.def("_tensor_core_emulate_gather_conv2d(Tensor x, Tensor indices, Tensor weight, Tensor? bias, "
        "int patch_size, int stride, int padding, int dilation, int groups, str activation) -> Tensor");
  m.def("_tensor_core_emulate_masker_conv1x1(Tensor x, Tensor weight, Tensor? bias, Tensor mask_weight, "
        "Tensor? mask_bias, int patch_size, int stride, str activation) -> (Tensor, Tensor)");
  m.def("_tensor_core_emulate_channel_gated_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? in_gates, "
        "Tensor? out_gates, int group_size, int[2] stride, int[2] padding, int[2] dilation, int groups, "
        "str activation) "
        "-> Tensor");
  m.def("_tensor_core_emulate_conv1x1_scatter_add_(Tensor(a!) out, Tensor packed, Tensor indices, "
        "Tensor weight, Tensor? bias, str activation) -> ()");
}

}  // namespace laudnet_ops

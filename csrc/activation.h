// Activations applied in kernel epilogues, resolved at compile time so the
// inner loops carry no branch on the activation kind.
#pragma once

#include <c10/macros/Macros.h>

#include <type_traits>

#include "checks.h"

namespace laudnet_ops {

template <Activation A, typename T>
C10_HOST_DEVICE inline T activate(T v) {
  if constexpr (A == Activation::kRelu) {
    return v < T(0) ? T(0) : v;  // keeps NaN, like torch.relu
  } else {
    return v;
  }
}

template <typename F>
void with_activation(Activation act, F&& f) {
  if (act == Activation::kRelu) {
    f(std::integral_constant<Activation, Activation::kRelu>{});
  } else {
    f(std::integral_constant<Activation, Activation::kNone>{});
  }
}

}  // namespace laudnet_ops

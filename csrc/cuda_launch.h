// Host-side helpers for the CUDA launchers: the kernels take int64 tensors as `long long*`
// (NVRTC has no <cstdint>), while ATen's int64_t is `long` on Linux; same size and layout.
#pragma once

#include <ATen/core/Tensor.h>

namespace foe {

static_assert(sizeof(long long) == sizeof(int64_t), "int64 tensors are passed as long long*");

inline const long long* ll_ptr(const at::Tensor& t) {
  return reinterpret_cast<const long long*>(t.const_data_ptr<int64_t>());
}

inline long long* ll_ptr_mut(at::Tensor& t) { return reinterpret_cast<long long*>(t.mutable_data_ptr<int64_t>()); }

}  // namespace foe

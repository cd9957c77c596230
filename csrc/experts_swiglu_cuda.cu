// foe::experts_swiglu_native on CUDA: launches kernels/experts_swiglu.cuh (correctness-first, graph-safe),
// and registers the CUDA kernels of both native ops.
#include "dispatch_types.h"
#include "cuda_launch.h"
#include "foe_ops.h"
#include "kernels/experts_swiglu.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <limits>

namespace foe {

static_assert(static_cast<int>(Activation::kSilu) == FOE_ACT_SILU &&
                  static_cast<int>(Activation::kGelu) == FOE_ACT_GELU &&
                  static_cast<int>(Activation::kGeluTanh) == FOE_ACT_GELU_TANH &&
                  static_cast<int>(Activation::kRelu2) == FOE_ACT_RELU2,
              "foe::Activation must number the activations as kernels/experts_swiglu.cuh does");

namespace {

template <typename scalar_t>
struct ExpertsKernels;
template <>
struct ExpertsKernels<float> {
  using type = float;
  static constexpr auto up = foe_experts_up_f32;
  static constexpr auto down = foe_experts_down_f32;
};
template <>
struct ExpertsKernels<at::BFloat16> {
  using type = foe_bf16;
  static constexpr auto up = foe_experts_up_bf16;
  static constexpr auto down = foe_experts_down_bf16;
};
template <>
struct ExpertsKernels<at::Half> {
  using type = foe_f16;
  static constexpr auto up = foe_experts_up_f16;
  static constexpr auto down = foe_experts_down_f16;
};

template <typename scalar_t>
const typename ExpertsKernels<scalar_t>::type* as_kernel(const at::Tensor& t) {
  return reinterpret_cast<const typename ExpertsKernels<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

// An optional bias as the kernels take it: null when absent.
template <typename scalar_t>
const typename ExpertsKernels<scalar_t>::type* as_kernel(const std::optional<at::Tensor>& t) {
  return t ? as_kernel<scalar_t>(*t) : nullptr;
}

std::optional<at::Tensor> contiguous_bias(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

}  // namespace

at::Tensor experts_swiglu_cuda(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                               const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                               const at::Tensor& sorted_pairs, const at::Tensor& expert_offsets, int64_t num_groups,
                               c10::string_view activation, const std::optional<at::Tensor>& gate_up_bias,
                               const std::optional<at::Tensor>& down_bias, double alpha, std::optional<double> limit,
                               double up_offset, bool weight_input) {
  const ExpertUnit unit = check_experts_args(x, gate_up, down, topk_ids, topk_weights, sorted_pairs, expert_offsets,
                                            num_groups, activation, gate_up_bias, down_bias, alpha, limit, up_offset);
  TORCH_CHECK(x.is_cuda(), "experts_swiglu_cuda got a ", x.device(), " tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xs = x.contiguous(), gu = gate_up.contiguous(), dn = down.contiguous();
  const auto ids = topk_ids.contiguous(), weights = topk_weights.contiguous(), pairs = sorted_pairs.contiguous();
  const auto gu_bias = contiguous_bias(gate_up_bias), dn_bias = contiguous_bias(down_bias);
  const int64_t T = xs.size(0), d = xs.size(1), k = ids.size(1), n = T * k;
  const int64_t E = gu.size(0), inter = unit.gated() ? gu.size(1) / 2 : gu.size(1);
  // The kernels take no limit as +inf: clamping to it changes nothing.
  const float limit_value = limit ? static_cast<float>(*limit) : std::numeric_limits<float>::infinity();
  auto out = at::empty({num_groups, T, d}, xs.options());                  // [G,T,d], every entry written
  auto hidden = at::empty({n, inter}, xs.options().dtype(at::kFloat));     // [T*k,I] by pair id
  if (n == 0) return out;
  TORCH_CHECK(inter <= 65535LL * FOE_ROWS_PER_BLOCK && d <= 65535LL * FOE_ROWS_PER_BLOCK,
              "experts_swiglu_cuda: I and d must be <= ", 65535 * FOE_ROWS_PER_BLOCK);
  // Grid x dimensions (n pairs, T * G rows); ids/pairs/offsets values are not checked on CUDA (foe_ops.h).
  TORCH_CHECK(n < INT_MAX && T * num_groups < INT_MAX, "experts_swiglu_cuda takes T*k and T*num_groups < 2^31; "
              "split the batch");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FOE_DISPATCH_FLOAT_TYPES(xs.scalar_type(), "experts_swiglu_cuda", [&] {
    using Kernels = ExpertsKernels<scalar_t>;
    const dim3 up_grid(static_cast<unsigned>(n), static_cast<unsigned>((inter + FOE_ROWS_PER_BLOCK - 1) / FOE_ROWS_PER_BLOCK));
    Kernels::up<<<up_grid, FOE_EXPERT_THREADS, 0, stream>>>(
        as_kernel<scalar_t>(xs), as_kernel<scalar_t>(gu), as_kernel<scalar_t>(gu_bias), ll_ptr(ids), ll_ptr(pairs),
        weight_input ? as_kernel<scalar_t>(weights) : nullptr, d, inter, static_cast<int>(k),
        static_cast<int>(unit.activation), static_cast<float>(alpha), limit_value, static_cast<float>(up_offset),
        hidden.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 down_grid(static_cast<unsigned>(T * num_groups), static_cast<unsigned>((d + FOE_ROWS_PER_BLOCK - 1) / FOE_ROWS_PER_BLOCK));
    Kernels::down<<<down_grid, FOE_EXPERT_THREADS, 0, stream>>>(
        as_kernel<scalar_t>(dn), as_kernel<scalar_t>(dn_bias), ll_ptr(ids),
        weight_input ? nullptr : as_kernel<scalar_t>(weights),  // weights scale either the input or the output
        hidden.const_data_ptr<float>(), d, inter, static_cast<int>(k), static_cast<int>(E / num_groups),
        static_cast<int>(num_groups), T,
        reinterpret_cast<typename Kernels::type*>(out.mutable_data_ptr<scalar_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace foe

TORCH_LIBRARY_IMPL(foe, CUDA, m) {
  m.impl("sum_route_dispatch_native", &foe::sum_route_dispatch_cuda);
  m.impl("experts_swiglu_native", &foe::experts_swiglu_cuda);
}

// foe::sum_route_dispatch_native on CUDA: validates, allocates and launches the kernels of
// kernels/route_dispatch.cuh (the same extern "C" entry points that CuPy compiles with NVRTC).
// Default (split): norm kernel, logits = at::linear(xn, router_weight, router_bias) (cuBLAS; the reference's own
// call), scores/top-k kernel (every router variant), grouping. FOE_CUDA_ROUTE=fused selects the older
// one-block-per-token kernel for default calls (softmax, no biases, no scaling, no group limit or weight
// variant); variants take the split path.
// Checked here (host, no synchronisation): shapes, dtypes, devices, and sizes the kernels' int indexing and
// shared memory can hold. Not checked: values (NaN/Inf inputs are legal: NaN ranks first in top-k, see
// kernels/route_dispatch.cuh; ids always land in [0, E) and the grouping kernels trap otherwise).
#include "dispatch_types.h"
#include "cuda_launch.h"
#include "foe_ops.h"
#include "kernels/route_dispatch.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace foe {

static_assert(static_cast<int>(Scoring::kSoftmax) == FOE_SCORE_SOFTMAX &&
                  static_cast<int>(Scoring::kSigmoid) == FOE_SCORE_SIGMOID &&
                  static_cast<int>(Scoring::kSqrtSoftplus) == FOE_SCORE_SQRTSOFTPLUS,
              "foe::Scoring and the FOE_SCORE_* codes of kernels/route_dispatch.cuh disagree");

namespace {

// at:: storage type -> the kernels' storage type and route entry point.
template <typename scalar_t>
struct RouteKernel;
template <>
struct RouteKernel<float> {
  using type = float;
  static constexpr auto launch = foe_route_tokens_f32;
  static constexpr auto norm = foe_route_norm_f32;
  static constexpr auto topk = foe_route_topk_f32;
};
template <>
struct RouteKernel<at::BFloat16> {
  using type = foe_bf16;
  static constexpr auto launch = foe_route_tokens_bf16;
  static constexpr auto norm = foe_route_norm_bf16;
  static constexpr auto topk = foe_route_topk_bf16;
};
template <>
struct RouteKernel<at::Half> {
  using type = foe_f16;
  static constexpr auto launch = foe_route_tokens_f16;
  static constexpr auto norm = foe_route_norm_f16;
  static constexpr auto topk = foe_route_topk_f16;
};

template <typename scalar_t>
const typename RouteKernel<scalar_t>::type* as_kernel(const at::Tensor& t) {
  return reinterpret_cast<const typename RouteKernel<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
typename RouteKernel<scalar_t>::type* as_kernel_mut(at::Tensor& t) {
  return reinterpret_cast<typename RouteKernel<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0; }

bool use_fused_kernel() {
  const char* choice = std::getenv("FOE_CUDA_ROUTE");
  return choice != nullptr && std::strcmp(choice, "fused") == 0;
}

}  // namespace

// Stable grouping of ids [n] by expert on the current stream: pairs [n], offsets [E+1].
void group_by_expert_cuda(const at::Tensor& ids, int64_t num_experts, at::Tensor& pairs, at::Tensor& offsets) {
  const int64_t n = ids.numel();
  TORCH_CHECK(n < INT_MAX && num_experts * 4 <= 48 * 1024,
              "group_by_expert_cuda supports T*k < 2^31 and E <= 12288; split the batch");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int E = static_cast<int>(num_experts);
  if (n <= FOE_GROUP_SMALL && (n + num_experts) * 4 <= 48 * 1024) {  // one block (also n = 0: offsets = 0)
    const size_t shared = static_cast<size_t>(n + num_experts) * sizeof(int);
    foe_group_small<<<1, FOE_GROUP_THREADS, shared, stream>>>(ll_ptr(ids), static_cast<int>(n), E,
                                                              ll_ptr_mut(pairs), ll_ptr_mut(offsets));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int tiles = static_cast<int>((n + FOE_TILE - 1) / FOE_TILE);  // >= 1 here
  TORCH_CHECK(static_cast<int64_t>(tiles) * num_experts < INT_MAX, "group_by_expert_cuda: E * T*k/", FOE_TILE,
              " must stay below 2^31; split the batch");
  auto tile_counts = at::empty({num_experts, tiles}, ids.options().dtype(at::kInt));  // [E, tiles]
  const size_t shared = static_cast<size_t>(E) * sizeof(int);
  foe_count_tiles<<<tiles, FOE_TILE, shared, stream>>>(ll_ptr(ids), static_cast<int>(n), E, tiles,
                                                       tile_counts.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  foe_scan_flat<<<1, FOE_SCAN_THREADS, 0, stream>>>(tile_counts.mutable_data_ptr<int>(), tiles, E,
                                                    ll_ptr_mut(offsets));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  foe_place_tiles<<<tiles, FOE_TILE, 0, stream>>>(ll_ptr(ids), static_cast<int>(n), E, tiles,
                                                  tile_counts.const_data_ptr<int>(), ll_ptr_mut(pairs));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

RouteOutputs sum_route_dispatch_cuda(const at::Tensor& residual, const at::Tensor& partials,
                                     const at::Tensor& norm_weight, double eps, const at::Tensor& router_weight,
                                     int64_t num_groups, int64_t top_k, bool renormalize, c10::string_view scoring,
                                     const std::optional<at::Tensor>& router_bias,
                                     const std::optional<at::Tensor>& correction_bias, double routed_scaling,
                                     int64_t n_group, int64_t topk_group, bool group_fill_zero,
                                     const std::optional<at::Tensor>& expert_scale, double renorm_eps,
                                     double renorm_min, bool topk_first) {
  check_route_args(residual, partials, norm_weight, router_weight, num_groups, top_k);
  const Scoring score = check_route_variant(router_weight, scoring, router_bias, correction_bias, routed_scaling);
  check_route_limits(router_weight, num_groups, correction_bias, n_group, topk_group, expert_scale, renorm_eps,
                     renorm_min, topk_first);
  TORCH_CHECK_VALUE(n_group <= FOE_MAX_GROUPS, "the CUDA route kernel keeps a group limit's groups in a ",
                    FOE_MAX_GROUPS, "-bit mask: n_group <= ", FOE_MAX_GROUPS, ", got ", n_group);
  const bool variant = score != Scoring::kSoftmax || router_bias || correction_bias || routed_scaling != 1.0 ||
                       n_group != 1 || expert_scale || renorm_eps != 0.0 || renorm_min != 0.0 || topk_first;
  TORCH_CHECK(partials.is_cuda(), "sum_route_dispatch_cuda got a ", partials.device(), " tensor");
  const c10::cuda::CUDAGuard guard(partials.device());
  const auto res = residual.contiguous(), par = partials.contiguous();
  const auto nw = norm_weight.contiguous(), rw = router_weight.contiguous();
  const int64_t H = par.size(0), T = par.size(1), d = par.size(2), E = rw.size(0);
  TORCH_CHECK((E + top_k) * 4 <= 48 * 1024, "the CUDA route kernel keeps E + top_k floats in shared memory: E <= 12000");
  at::Tensor r, xn, ids, weights, pairs, offsets;
  std::tie(r, xn, ids, weights, pairs, offsets) = empty_route_outputs(par, E, top_k);
  TORCH_CHECK(T < INT_MAX && T * top_k < INT_MAX, "the CUDA route kernels take T*k < 2^31 (T=", T, ", k=", top_k,
              "); split the batch");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (T > 0 && !variant && use_fused_kernel()) {
    FOE_DISPATCH_FLOAT_TYPES(par.scalar_type(), "sum_route_dispatch_cuda", [&] {
      const size_t shared = static_cast<size_t>(E + top_k) * sizeof(float);
      RouteKernel<scalar_t>::launch<<<T, FOE_ROUTE_THREADS, shared, stream>>>(
          as_kernel<scalar_t>(res), res.size(0) == 1 ? 0 : T * d, as_kernel<scalar_t>(par),
          as_kernel<scalar_t>(nw), as_kernel<scalar_t>(rw), static_cast<float>(eps), static_cast<int>(H), T, d,
          static_cast<int>(E), static_cast<int>(top_k), renormalize ? 1 : 0, as_kernel_mut<scalar_t>(r),
          as_kernel_mut<scalar_t>(xn), ll_ptr_mut(ids), as_kernel_mut<scalar_t>(weights));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else if (T > 0) {
    FOE_DISPATCH_FLOAT_TYPES(par.scalar_type(), "sum_route_dispatch_cuda", [&] {
      constexpr int64_t vec = 16 / sizeof(scalar_t);
      const bool vectorised = d % vec == 0 && aligned16(res) && aligned16(par) && aligned16(nw) &&
                              aligned16(r) && aligned16(xn);
      RouteKernel<scalar_t>::norm<<<static_cast<unsigned>(T), FOE_NORM_THREADS, 0, stream>>>(
          as_kernel<scalar_t>(res), res.size(0) == 1 ? 0 : T * d, as_kernel<scalar_t>(par), as_kernel<scalar_t>(nw),
          static_cast<float>(eps), static_cast<int>(H), T, d, vectorised ? 1 : 0, as_kernel_mut<scalar_t>(r),
          as_kernel_mut<scalar_t>(xn));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // The reference's call (F.linear in the dtype, cuBLAS); the top-k kernel reads the dtype logits and
      // converts them exactly, as .float() does.
      const auto logits = at::linear(xn, router_weight, router_bias).contiguous();  // [T, E]
      // The correction bias in fp32 (exact from bf16/fp16), read by the top-k kernel's selection.
      const auto correction = correction_bias ? correction_bias->to(at::kFloat).contiguous() : at::Tensor();
      const auto scale = expert_scale ? expert_scale->to(at::kFloat).contiguous() : at::Tensor();  // [E] fp32
      const int64_t per_warp = (E + top_k) * static_cast<int64_t>(sizeof(float));
      const int64_t warps = std::max<int64_t>(1, std::min<int64_t>({FOE_TOPK_WARPS, 48 * 1024 / per_warp, T}));
      const int64_t blocks = (T + warps - 1) / warps;
      RouteKernel<scalar_t>::topk<<<static_cast<unsigned>(blocks), static_cast<unsigned>(32 * warps),
                                     static_cast<size_t>(warps * per_warp), stream>>>(
          as_kernel<scalar_t>(logits), T, static_cast<int>(E), static_cast<int>(num_groups), static_cast<int>(top_k),
          renormalize ? 1 : 0, static_cast<int>(score),
          correction.defined() ? correction.const_data_ptr<float>() : nullptr, static_cast<float>(routed_scaling),
          static_cast<int>(n_group), static_cast<int>(topk_group), group_fill_zero ? 1 : 0,
          scale.defined() ? scale.const_data_ptr<float>() : nullptr, static_cast<float>(renorm_eps),
          static_cast<float>(renorm_min), topk_first ? 1 : 0, ll_ptr_mut(ids), as_kernel_mut<scalar_t>(weights));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  group_by_expert_cuda(ids, E, pairs, offsets);
  return {r, xn, ids, weights, pairs, offsets};
}

}  // namespace foe

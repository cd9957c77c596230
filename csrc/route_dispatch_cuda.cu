// foe::sum_route_dispatch_native on CUDA: validates, allocates and launches the kernels of
// kernels/route_dispatch.cuh (the same extern "C" entry points that CuPy compiles with NVRTC).
#include "dispatch_types.h"
#include "cuda_launch.h"
#include "foe_ops.h"
#include "kernels/route_dispatch.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>

namespace foe {

namespace {

// at:: storage type -> the kernels' storage type and route entry point.
template <typename scalar_t>
struct RouteKernel;
template <>
struct RouteKernel<float> {
  using type = float;
  static constexpr auto launch = foe_route_tokens_f32;
};
template <>
struct RouteKernel<at::BFloat16> {
  using type = foe_bf16;
  static constexpr auto launch = foe_route_tokens_bf16;
};
template <>
struct RouteKernel<at::Half> {
  using type = foe_f16;
  static constexpr auto launch = foe_route_tokens_f16;
};

template <typename scalar_t>
const typename RouteKernel<scalar_t>::type* as_kernel(const at::Tensor& t) {
  return reinterpret_cast<const typename RouteKernel<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
typename RouteKernel<scalar_t>::type* as_kernel_mut(at::Tensor& t) {
  return reinterpret_cast<typename RouteKernel<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

}  // namespace

// Stable grouping of ids [n] by expert on the current stream: pairs [n], offsets [E+1].
void group_by_expert_cuda(const at::Tensor& ids, int64_t num_experts, at::Tensor& pairs, at::Tensor& offsets) {
  const int64_t n = ids.numel();
  TORCH_CHECK(n < INT_MAX && num_experts * 4 <= 48 * 1024,
              "group_by_expert_cuda supports T*k < 2^31 and E <= 12288; split the batch");
  const int tiles = static_cast<int>((n + FOE_TILE - 1) / FOE_TILE);
  auto tile_counts = at::empty({std::max(tiles, 1), num_experts}, ids.options().dtype(at::kInt));  // [tiles,E]
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int E = static_cast<int>(num_experts), shared = E * static_cast<int>(sizeof(int));
  if (tiles > 0) {
    foe_count_tiles<<<tiles, FOE_TILE, shared, stream>>>(ll_ptr(ids), static_cast<int>(n), E,
                                                         tile_counts.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  foe_scan_tiles<<<1, 1024, shared, stream>>>(tile_counts.mutable_data_ptr<int>(), tiles, E,
                                              ll_ptr_mut(offsets));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (tiles > 0) {
    foe_place_tiles<<<tiles, FOE_TILE, 0, stream>>>(ll_ptr(ids), static_cast<int>(n), E,
                                                    tile_counts.const_data_ptr<int>(),
                                                    ll_ptr_mut(pairs));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

RouteOutputs sum_route_dispatch_cuda(const at::Tensor& residual, const at::Tensor& partials,
                                     const at::Tensor& norm_weight, double eps, const at::Tensor& router_weight,
                                     int64_t num_groups, int64_t top_k, bool renormalize) {
  check_route_args(residual, partials, norm_weight, router_weight, num_groups, top_k);
  TORCH_CHECK(partials.is_cuda(), "sum_route_dispatch_cuda got a ", partials.device(), " tensor");
  const c10::cuda::CUDAGuard guard(partials.device());
  const auto res = residual.contiguous(), par = partials.contiguous();
  const auto nw = norm_weight.contiguous(), rw = router_weight.contiguous();
  const int64_t H = par.size(0), T = par.size(1), d = par.size(2), E = rw.size(0);
  TORCH_CHECK((E + top_k) * 4 <= 48 * 1024, "the CUDA route kernel keeps E + top_k floats in shared memory: E <= 12000");
  auto r = at::empty({T, d}, par.options());
  auto xn = at::empty({T, d}, par.options());
  auto ids = at::empty({T, top_k}, par.options().dtype(at::kLong));
  auto weights = at::empty({T, top_k}, par.options());
  auto pairs = at::empty({T * top_k}, par.options().dtype(at::kLong));
  auto offsets = at::empty({E + 1}, par.options().dtype(at::kLong));
  if (T > 0) {
    FOE_DISPATCH_FLOAT_TYPES(par.scalar_type(), "sum_route_dispatch_cuda", [&] {
      const size_t shared = static_cast<size_t>(E + top_k) * sizeof(float);
      RouteKernel<scalar_t>::launch<<<T, FOE_ROUTE_THREADS, shared, c10::cuda::getCurrentCUDAStream()>>>(
          as_kernel<scalar_t>(res), res.size(0) == 1 ? 0 : T * d, as_kernel<scalar_t>(par),
          as_kernel<scalar_t>(nw), as_kernel<scalar_t>(rw), static_cast<float>(eps), static_cast<int>(H), T, d,
          static_cast<int>(E), static_cast<int>(top_k), renormalize ? 1 : 0, as_kernel_mut<scalar_t>(r),
          as_kernel_mut<scalar_t>(xn), ll_ptr_mut(ids), as_kernel_mut<scalar_t>(weights));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  group_by_expert_cuda(ids, E, pairs, offsets);
  return {r, xn, ids, weights, pairs, offsets};
}

}  // namespace foe

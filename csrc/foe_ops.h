// C++ entry points of the foe:: kernels (CPU always, CUDA when built with CUDA).
// Semantics: foe_compile/kernels/reference.py. Shapes: T tokens, d hidden, H groups (num_groups),
// E experts, k = top_k picks per token (k/H per group), I expert intermediate size.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace foe {

// (r [T,d], xn [T,d], topk_ids [T,k] int64, topk_weights [T,k], sorted_pairs [T*k] int64,
//  expert_offsets [E+1] int64)
using RouteOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Uninitialised (r [T,d], xn [T,d], ids [T,k], weights [T,k], pairs [T*k], offsets [E+1]) on partials' device.
RouteOutputs empty_route_outputs(const at::Tensor& partials /*[H,T,d]*/, int64_t num_experts, int64_t top_k);

// The router's scores (reference.router_scores); the values are the FOE_SCORE_* codes the CUDA kernels take
// (kernels/route_dispatch.cuh; asserted in route_dispatch_cuda.cu).
enum class Scoring : int { kSoftmax = 0, kSigmoid = 1, kSqrtSoftplus = 2 };

// The router-variant arguments of foe::sum_route_dispatch (after renormalize), checked: raises ValueError (as
// ops.check_route_variant) on an unknown scoring, a non-finite routed_scaling, a bias that is not [E], a
// router_bias outside the router's dtype, a correction_bias outside {the router's dtype, float32}, or a bias on
// another device. Returns the parsed scoring.
Scoring check_route_variant(const at::Tensor& router_weight, c10::string_view scoring,
                            const std::optional<at::Tensor>& router_bias,
                            const std::optional<at::Tensor>& correction_bias, double routed_scaling);

// The group-limit and weight variants of foe::sum_route_dispatch (after routed_scaling), checked as
// ops.check_route_variant / check_route_args do (ValueError): n_group splits E into equal groups of >= 2 with
// 1 <= topk_group <= n_group, and needs num_groups = 1 (the FoE quota replaces a group limit); expert_scale
// [E] in the router's dtype or float32 on its device; finite renorm_eps, renorm_min >= 0; topk_first without
// a correction bias or a group limit.
void check_route_limits(const at::Tensor& router_weight, int64_t num_groups,
                        const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
                        const std::optional<at::Tensor>& expert_scale, double renorm_eps, double renorm_min,
                        bool topk_first);

// The expert unit of foe::experts_swiglu between its two projections (reference.expert_unit). The values are
// the FOE_ACT_* codes the CUDA kernels take (kernels/experts_swiglu.cuh; asserted in experts_swiglu_cuda.cu).
enum class Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu2 = 3 };

struct ExpertUnit {
  Activation activation = Activation::kSilu;
  double alpha = 1.0;           // silu only: g * sigmoid(alpha * g)
  std::optional<double> limit;  // gated only: g = min(g, limit), u = clamp(u, -limit, limit)
  double up_offset = 0.0;       // gated only: act(g) * (u + up_offset)
  // Gated units read gate_up [E, 2I, d] (gate rows first), ungated ones (relu2) gate_up [E, I, d].
  bool gated() const { return activation != Activation::kRelu2; }
};

// Argument checks shared by every device (messages say what to change).
void check_route_args(const at::Tensor& residual, const at::Tensor& partials, const at::Tensor& norm_weight,
                      const at::Tensor& router_weight, int64_t num_groups, int64_t top_k);
// The arguments of foe::experts_swiglu, in schema order, checked for every device; returns the unit parsed
// once. Raises ValueError (as ops.check_experts_args) on an unknown activation, alpha != 1 with another
// activation than silu, limit/up_offset with an ungated unit or a NaN limit, and on shapes that disagree.
ExpertUnit check_experts_args(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                              const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                              const at::Tensor& sorted_pairs, const at::Tensor& expert_offsets, int64_t num_groups,
                              c10::string_view activation, const std::optional<at::Tensor>& gate_up_bias,
                              const std::optional<at::Tensor>& down_bias, double alpha, std::optional<double> limit,
                              double up_offset);

// Values of the routing tensors passed to foe::experts_swiglu, O(T*k + E) on CPU tensors (contiguous
// int64; shapes already checked by check_experts_args). Raises unless expert_offsets [E+1] starts at 0, never
// decreases and ends at T*k; every topk_ids entry is in [0, E); sorted_pairs [T*k] holds every pair index
// p in [0, T*k) exactly once, in the segment of expert topk_ids.flatten()[p]. Then no kernel indexes out of
// bounds and every implementation computes the same sum.
// On CUDA the values are NOT checked (that needs a device-to-host copy, i.e. a synchronisation, which the
// CUDA-graph-safe ops avoid): the CUDA/CuPy entry points check shapes, dtypes and devices only, and trust
// ids/pairs/offsets to come from foe::sum_route_dispatch, whose kernels emit ids in [0, E) also for NaN
// inputs; its grouping kernels trap (__trap) on an id outside [0, E) rather than write out of bounds.
void check_routing_indices(const at::Tensor& topk_ids /*[T,k]*/, const at::Tensor& sorted_pairs /*[T*k]*/,
                           const at::Tensor& expert_offsets /*[E+1]*/, int64_t num_experts);

// Stable counting sort of the flattened picks by expert, on the host.
void group_by_expert_host(const int64_t* ids /*[n]*/, int64_t n, int64_t num_experts,
                          int64_t* pairs /*[n]*/, int64_t* offsets /*[E+1]*/);

RouteOutputs sum_route_dispatch_cpu(const at::Tensor& residual /*[1 or H,T,d]*/, const at::Tensor& partials /*[H,T,d]*/,
                                    const at::Tensor& norm_weight /*[d]*/, double eps,
                                    const at::Tensor& router_weight /*[E,d]*/, int64_t num_groups, int64_t top_k,
                                    bool renormalize, c10::string_view scoring = "softmax",
                                    const std::optional<at::Tensor>& router_bias = std::nullopt /*[E]*/,
                                    const std::optional<at::Tensor>& correction_bias = std::nullopt /*[E]*/,
                                    double routed_scaling = 1.0, int64_t n_group = 1, int64_t topk_group = 1,
                                    bool group_fill_zero = false,
                                    const std::optional<at::Tensor>& expert_scale = std::nullopt /*[E]*/,
                                    double renorm_eps = 0.0, double renorm_min = 0.0, bool topk_first = false);

// The arguments after num_groups are the schema's unit arguments, with its defaults (the plain SiLU SwiGLU), then
// weight_input: the routing weight scales the expert's input (w * x_t, in x's dtype) instead of its output.
at::Tensor experts_swiglu_cpu(const at::Tensor& x /*[T,d]*/, const at::Tensor& gate_up /*[E,2I,d] or [E,I,d]*/,
                              const at::Tensor& down /*[E,d,I]*/, const at::Tensor& topk_ids /*[T,k]*/,
                              const at::Tensor& topk_weights /*[T,k]*/, const at::Tensor& sorted_pairs /*[T*k]*/,
                              const at::Tensor& expert_offsets /*[E+1]*/, int64_t num_groups,
                              c10::string_view activation = "silu",
                              const std::optional<at::Tensor>& gate_up_bias = std::nullopt /*[E,2I] or [E,I]*/,
                              const std::optional<at::Tensor>& down_bias = std::nullopt /*[E,d]*/, double alpha = 1.0,
                              std::optional<double> limit = std::nullopt, double up_offset = 0.0,
                              bool weight_input = false);

#ifdef FOE_WITH_CUDA
RouteOutputs sum_route_dispatch_cuda(const at::Tensor& residual, const at::Tensor& partials,
                                     const at::Tensor& norm_weight, double eps, const at::Tensor& router_weight,
                                     int64_t num_groups, int64_t top_k, bool renormalize, c10::string_view scoring,
                                     const std::optional<at::Tensor>& router_bias,
                                     const std::optional<at::Tensor>& correction_bias, double routed_scaling,
                                     int64_t n_group, int64_t topk_group, bool group_fill_zero,
                                     const std::optional<at::Tensor>& expert_scale, double renorm_eps,
                                     double renorm_min, bool topk_first);
at::Tensor experts_swiglu_cuda(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                               const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                               const at::Tensor& sorted_pairs, const at::Tensor& expert_offsets, int64_t num_groups,
                               c10::string_view activation, const std::optional<at::Tensor>& gate_up_bias,
                               const std::optional<at::Tensor>& down_bias, double alpha, std::optional<double> limit,
                               double up_offset, bool weight_input);
#endif

}  // namespace foe

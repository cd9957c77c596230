// foe::experts_swiglu on CPU: per expert, one gathered GEMM pair over the rows routed to it.
//   out[g(e), t] += w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))   for the picks (t, j) of expert e
// Experts run in ascending order and each add rounds to x's dtype, as in reference.py, so results
// match the reference up to GEMM summation order.
#include "foe_ops.h"

#include <ATen/ATen.h>

namespace foe {

at::Tensor experts_swiglu_cpu(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                              const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                              const at::Tensor& sorted_pairs, const at::Tensor& expert_offsets, int64_t num_groups) {
  check_experts_args(x, gate_up, down, topk_ids, topk_weights, sorted_pairs, expert_offsets, num_groups);
  TORCH_CHECK(x.device().is_cpu(), "experts_swiglu_cpu got a ", x.device(), " tensor");
  check_routing_indices(topk_ids, sorted_pairs, expert_offsets, gate_up.size(0));  // ids, pairs, offsets in range
  const int64_t T = x.size(0), d = x.size(1), k = topk_ids.size(1);
  const int64_t E = gate_up.size(0), I = gate_up.size(1) / 2, experts_per_group = E / num_groups;
  auto out = at::zeros({num_groups, T, d}, x.options());  // [G,T,d]
  if (T == 0) return out;

  const auto pairs = sorted_pairs.reshape({-1});                         // [T*k] p = t*k + j, grouped by expert
  const auto tokens = at::floor_divide(pairs, k);                        // [T*k] token of each pair
  const auto pair_weights = topk_weights.reshape({-1}).index_select(0, pairs).unsqueeze(1);  // [T*k,1]
  const auto rows = x.index_select(0, tokens);                           // [T*k,d] gathered once
  const auto offsets = expert_offsets.to(at::kCPU).contiguous();
  const int64_t* bounds = offsets.const_data_ptr<int64_t>();             // [E+1]
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = bounds[e], end = bounds[e + 1];
    if (end == begin) continue;
    const auto gate_up_out = at::linear(rows.slice(0, begin, end), gate_up[e]);  // [n,2I]
    const auto hidden = at::silu(gate_up_out.slice(1, 0, I)) * gate_up_out.slice(1, I, 2 * I);  // [n,I]
    const auto y = at::linear(hidden, down[e]) * pair_weights.slice(0, begin, end);             // [n,d]
    out[e / experts_per_group].index_add_(0, tokens.slice(0, begin, end), y);
  }
  return out;
}

}  // namespace foe

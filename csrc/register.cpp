// Registers foe::sum_route_dispatch_native and foe::experts_swiglu_native (the public ops' schemas)
// and their CPU kernels. CUDA kernels register in the .cu files; fake impls live in native.py.
#include "foe_ops.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(foe, m) {
  m.def(
      "sum_route_dispatch_native(Tensor residual, Tensor partials, Tensor norm_weight, float eps, "
      "Tensor router_weight, int num_groups, int top_k, bool renormalize, str scoring=\"softmax\", "
      "Tensor? router_bias=None, Tensor? correction_bias=None, float routed_scaling=1.0, int n_group=1, "
      "int topk_group=1, bool group_fill_zero=False, Tensor? expert_scale=None, float renorm_eps=0.0, "
      "float renorm_min=0.0, bool topk_first=False) -> (Tensor r, Tensor xn, "
      "Tensor topk_ids, Tensor topk_weights, Tensor sorted_pairs, Tensor expert_offsets)");
  m.def(
      "experts_swiglu_native(Tensor x, Tensor gate_up, Tensor down, Tensor topk_ids, Tensor topk_weights, "
      "Tensor sorted_pairs, Tensor expert_offsets, int num_groups, str activation=\"silu\", "
      "Tensor? gate_up_bias=None, Tensor? down_bias=None, float alpha=1.0, float? limit=None, float up_offset=0.0, "
      "bool weight_input=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(foe, CPU, m) {
  m.impl("sum_route_dispatch_native", &foe::sum_route_dispatch_cpu);
  m.impl("experts_swiglu_native", &foe::experts_swiglu_cpu);
}

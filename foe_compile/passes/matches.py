"""What the find_* passes record in gm.meta for the rewriting passes that follow."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from .expert_unit import ExpertMLP, Unit

MOE_KEY = "foe_moe_blocks"
ATTENTION_KEY = "foe_attention"
PARTIALS_KEY = "foe_partials"  # attention output node -> its per-group partials [H, ..., d]
DENSE_KEY = "foe_dense_splits"
UNTOUCHED_KEY = "foe_untouched_blocks"  # [(router node name, why the block was left as written)]


@dataclass
class MoEMatch:
    """One MoE block: router -> top-k -> experts -> weighted combine."""

    kind: str  # "grouped_mm" (transformers v5), "select_loop" (per-expert token selection), "dense_loop",
    #            "sort_split" (sort_split.py), "dense_weighted_input" (every expert on every token, the
    #            weight scaling its input: Llama 4, dense_experts.py)
    hidden: fx.Node  # experts' input [..., d]
    router_input: fx.Node | None  # what the router linear reads (a view of `hidden`); None: graph routing
    router_weight: fx.Node | None  # [E, d]; None when the routing stays in the graph
    ids: fx.Node  # top-k expert ids [..., k]
    weights: fx.Node  # routing weights [..., k] (or [..., E]: weights_by_expert), as the experts consume them
    renormalize: bool
    top_k: int
    num_experts: int
    output: fx.Node  # the block's combined output [..., d]
    unit: Unit = field(default_factory=Unit)  # what each expert computes between its projections
    # grouped_mm kind: the stacked weights [E, 2I, d] / [E, d, I] (transposed: stored [E, d, 2I] /
    # [E, I, d], as gpt-oss does) and stacked biases [E, 2I] / [E, d], in the source's column layout
    gate_up: fx.Node | None = None
    down: fx.Node | None = None
    gate_up_transposed: bool = False
    down_transposed: bool = False
    gate_up_bias: fx.Node | None = None
    down_bias: fx.Node | None = None
    per_expert: list[ExpertMLP] = field(default_factory=list)  # the loop kinds: one per expert
    # The dense form (dense_experts.py): `weights` is the [T, E] matrix, 0 off the picks (lowering gathers the
    # picks), and the routing weight scales the expert's input (foe::experts_swiglu's weight_input).
    weights_by_expert: bool = False
    weight_input: bool = False
    internal: set[fx.Node] = field(default_factory=set)  # expert-compute nodes lowering replaces
    route: fx.Node | None = None  # the foe::sum_route_dispatch node, once fused
    group_partials: fx.Node | None = None  # foe::experts_swiglu's [H, T, d] output, once lowered
    # Why foe::sum_route_dispatch cannot compute this block's routing (sigmoid scores, a router bias,
    # grouped top-k...): the routing then stays in the graph as written and only the experts are
    # lowered (exact form); the FoE form, which needs quota routing in the fused op, is refused.
    graph_routing: str | None = None
    # The fused op's routing variant (moe_router.DEFAULT_VARIANT's keys: scoring, biases, group limit, weight variants)
    routing: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """A name for reports: the router weight's, else the expert ids'."""
        return (self.router_weight or self.ids).name


@dataclass
class AttentionMatch:
    """Grouped-query attention: q/k/v projections -> SDPA (KV heads repeated) -> o_proj."""

    sdpa: fx.Node
    q_proj: fx.Node
    k_proj: fx.Node
    v_proj: fx.Node
    o_proj: fx.Node  # aten.linear over the concatenated heads
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # Set by partition_groups: group h's slice of the o_proj input (its heads), one per group.
    group_heads: list[fx.Node] = field(default_factory=list)
    reads_group_streams: bool = False  # set by split_group_streams: group h reads r + c*m_h


@dataclass
class DenseSplit:
    """A dense SwiGLU MLP (a dense layer's, or a shared expert) split tensor-parallel into H shares."""

    output: fx.Node  # sum over the shares [..., d], in place of the MLP's output
    group_partials: fx.Node  # the shares [H, ..., d]

"""FoEConfig: what `convert()` is asked to build, and the rules for which requests are valid."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Mode = Literal["foe", "exact"]
_ASSIGNMENTS = ("contiguous", "calibrated")


@dataclass
class FoEConfig:
    """How to convert a Mixture-of-Experts model.

    mode: "foe" (the paper's form: one residual stream per group, quota top-(k/H) routing)
        or "exact" (shared stream, global top-k, a second all-reduce after the MoE; the
        output equals the source model up to summation order).
    num_groups: H, the number of expert groups. None = the KV-head count when valid, else
        the largest H dividing the KV-head count, E and k (DESIGN.md).
    expert_assignment: "contiguous" (group h owns experts [h*E/H, (h+1)*E/H)), "calibrated"
        (co-selected experts placed in different groups, from calibration inputs), or an
        explicit permutation of range(E) shared by all layers (group h owns perm[h*E/H:...]).
    attn_stream_scale: c in [1, H]: FoE attention of group h reads r_full + c*m_h while the
        stream still contributes r_full + H*m_h to the mean. None = H (the paper's stream).
    report_gpus: G, the GPU count used for the report's communication volumes.
    """

    mode: Mode = "foe"
    num_groups: int | None = None
    expert_assignment: str | list[int] = "contiguous"
    attn_stream_scale: float | None = None
    report_gpus: int = 8
    # Resolved by convert(): one permutation of range(E) per MoE layer (layer index -> perm).
    layer_assignments: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("foe", "exact"):
            raise ValueError(f"FoEConfig.mode must be 'foe' or 'exact', got {self.mode!r}")
        if self.num_groups is not None and (not isinstance(self.num_groups, int) or self.num_groups < 1):
            raise ValueError(f"FoEConfig.num_groups must be a positive int or None, got {self.num_groups!r}")
        if isinstance(self.expert_assignment, str) and self.expert_assignment not in _ASSIGNMENTS:
            raise ValueError(
                f"FoEConfig.expert_assignment must be one of {_ASSIGNMENTS} or a permutation list, "
                f"got {self.expert_assignment!r}"
            )
        if self.mode == "exact" and self.attn_stream_scale is not None:
            raise ValueError("attn_stream_scale only applies to mode='foe' (the exact form has one shared stream)")
        if self.report_gpus < 1:
            raise ValueError(f"FoEConfig.report_gpus must be >= 1, got {self.report_gpus}")
        # JSON round trips turn int keys into strings.
        self.layer_assignments = {int(k): list(v) for k, v in self.layer_assignments.items()}

    def replace(self, **overrides: Any) -> FoEConfig:
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown FoEConfig option(s) {unknown}; valid options: {sorted(names)}")
        return FoEConfig(**{**asdict(self), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FoEConfig:
        return cls(**data)


def valid_group_counts(num_kv_heads: int, num_experts: int, top_k: int, mode: Mode) -> list[int]:
    """H values that split attention by whole KV heads and experts into equal blocks.

    FoE mode also needs k divisible by H (quota k/H per group); exact mode routes globally.
    """
    g = math.gcd(num_kv_heads, num_experts)
    if mode == "foe":
        g = math.gcd(g, top_k)
    return [h for h in range(1, g + 1) if g % h == 0]


def default_group_count(num_kv_heads: int, num_experts: int, top_k: int, mode: Mode) -> int:
    """The KV-head count when valid, else the largest valid H (DESIGN.md)."""
    return max(valid_group_counts(num_kv_heads, num_experts, top_k, mode))

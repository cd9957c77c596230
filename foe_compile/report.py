"""ConversionReport: what convert() built, what is exact, what is approximate and by how much."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


def quota_reason(top_k: int, num_groups: int, num_experts: int) -> str:
    return (f"quota routing: top-{top_k // num_groups} in each of {num_groups} blocks of {num_experts // num_groups} "
            f"experts, not global top-{top_k}")


def group_limit_reason(n_group: int, topk_group: int) -> str:
    return (f"group limit replaced by the quota: the source keeps the best {topk_group} of {n_group} expert groups, "
            "the FoE form none (each FoE group picks its own quota)")


def stream_reason(attn_stream_scale: float) -> str:
    return f"group streams: attention reads r_full + {attn_stream_scale:g}*m_h, the source r_full + sum_h m_h"


@dataclass
class LayerReport:
    index: int
    kind: str  # "moe" or "dense"
    exact: bool
    reasons: list[str] = field(default_factory=list)  # why approximate (empty when exact)
    notes: list[str] = field(default_factory=list)  # exact but worth knowing
    routing_agreement: float | None = None  # fraction of the global top-k kept by quota routing
    prob_mass_kept: float | None = None  # router probability of quota picks / of global top-k
    hidden_rel_error: float | None = None  # ||h_foe - h_src|| / ||h_src|| after this layer


@dataclass
class CommunicationReport:
    gpus: int
    hidden_size: int
    num_layers: int
    # Per layer, in units of T*d elements (paper Tables 3-4).
    ep_per_layer: float
    foe_per_layer: float
    exact_per_layer: float

    def bytes_per_token(self, per_layer: float, bytes_per_element: int = 2) -> float:
        return per_layer * self.hidden_size * self.num_layers * bytes_per_element


@dataclass
class ConversionReport:
    model_type: str
    mode: str
    num_groups: int
    num_experts: int
    top_k: int
    expert_assignment: str
    attn_stream_scale: float | None
    conversion_seconds: float
    layers: list[LayerReport]
    communication: CommunicationReport
    logits_rel_error: float | None = None  # ||logits_foe - logits_src|| / ||logits_src||
    logits_max_rel_error: float | None = None  # max |diff| / max |logits_src|
    next_token_agreement: float | None = None  # argmax agreement with the source
    calibration_tokens: int = 0
    untouched_blocks: list[str] = field(default_factory=list)  # "router: why" for MoE blocks left as written
    # Translation validation: max |converted - source| / max |source| over every output, on the
    # capture/calibration inputs and random inputs of their shapes; None = not measured (meta device).
    validation_error: float | None = None
    validation_tolerance: float | None = None

    @property
    def structurally_exact(self) -> bool:
        """Every layer's rewrite is exact by construction (no quota routing, no group streams)."""
        return all(layer.exact for layer in self.layers)

    @property
    def exact(self) -> bool:
        """Exact by construction AND measured so: the validation error is within the tolerance."""
        return (self.structurally_exact and self.validation_error is not None
                and self.validation_tolerance is not None and self.validation_error <= self.validation_tolerance)

    def exactness(self) -> str:
        """One line: exact or not, and the measured number behind it."""
        if self.validation_error is None:
            measured = "outputs not measured against the source"
        else:
            sign = "<=" if self.validation_error <= (self.validation_tolerance or 0.0) else ">"
            measured = (f"measured max rel err {self.validation_error:.2e} {sign} tolerance "
                        f"{self.validation_tolerance:.0e}")
        verdict = "exact" if self.exact else ("exact structure, unverified" if self.structurally_exact
                                              and self.validation_error is None else "NOT exact")
        return f"{verdict}: {measured}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exact": self.exact, "structurally_exact": self.structurally_exact}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self) -> str:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        lines = [
            f"{self.model_type}: mode={self.mode} H={self.num_groups} E={self.num_experts} k={self.top_k} "
            f"assignment={self.expert_assignment} converted in {self.conversion_seconds:.3f} s "
            f"({self.exactness()})",
            f"{'layer':>5} {'kind':>5} {'exact':>5} {'agree':>6} {'mass':>6} {'h err':>9}  why",
        ]
        for lr in self.layers:
            why = "; ".join(lr.reasons) or "; ".join(lr.notes)
            lines.append(
                f"{lr.index:>5} {lr.kind:>5} {'yes' if lr.exact else 'no':>5} {fmt(lr.routing_agreement, '6.3f'):>6} "
                f"{fmt(lr.prob_mass_kept, '6.3f'):>6} {fmt(lr.hidden_rel_error, '9.2e'):>9}  {why}"
            )
        lines += [f"  left as written: {why}" for why in self.untouched_blocks]
        if self.logits_rel_error is not None:
            on = f"{self.calibration_tokens} calibration tokens" if self.calibration_tokens else "random token ids"
            lines.append(
                f"outputs vs source on {on}: rel err {fmt(self.logits_rel_error, '.2e')}, "
                f"max rel err {fmt(self.logits_max_rel_error, '.2e')}, "
                f"next-token agreement {fmt(self.next_token_agreement, '.3f')}"
            )
        else:
            lines.append("outputs not measured (meta device): routing agreement and errors unknown")
        c = self.communication
        per = lambda v: f"{v:.3f} T*d/layer, {c.bytes_per_token(v) / 1024:.1f} KiB/token (bf16)"  # noqa: E731
        lines += [
            f"communication on G={c.gpus} GPUs ({c.num_layers} layers, d={c.hidden_size}):",
            f"  expert-parallel all-to-all: {per(c.ep_per_layer)}",
            f"  FoE:                        {per(c.foe_per_layer)}",
            f"  exact (2 all-reduces):      {per(c.exact_per_layer)}",
        ]
        return "\n".join(lines)

"""distributed-bench: FoE vs EP vs exact on the same inputs, per-layer counted bytes and times.

Runs on every rank of an initialised process group (torchrun, or `spawn` in bench/). Inputs:
one batch [B, T] of random token ids. FoE and exact: every rank holds the whole batch (G <= H;
FoE with G > H shards it over the ranks of a group). EP twice: "ep" with the batch split by
sequence (data-parallel attention, each rank T*B/G tokens) and "ep_replicated" with the whole
batch on every rank (each rank dispatches all B*T tokens: the paper's per-rank accounting).
Bytes are logical bytes sent per rank (accounting.py), averaged over ranks; "formula" is the
comm.py volume times (tokens per rank) * d * element size (EP: under uniform routing).
"""
from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist

from ..builtin import builtin_model
from ..comm import all_reduce_volume, ep_volume, exact_volume
from ..config import FoEConfig
from .accounting import FINAL
from .base import shard_batch
from .ep_baseline import build_ep
from .exact_runtime import build_exact
from .foe_runtime import build_foe
from .launch import check_seconds

PAYLOAD = ("stream_mean", "attn_sum", "moe_sum", "dispatch", "combine")


def run_bench(model_name: str, tokens: int, batch: int, groups: int | None, repeats: int, seed: int,
              device: torch.device, timeout_s: float | None = None, **overrides) -> dict:
    """On every rank; returns (on every rank) the report averaged over ranks."""
    check_bench_args(tokens, batch, groups, repeats, timeout_s)
    G, rank = dist.get_world_size(), dist.get_rank()
    source = builtin_model(model_name, seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, source.config.vocab_size, (batch, tokens), generator=g)
    d, k, esize = source.config.hidden_size, int(source.config.num_experts_per_tok), 4
    H = groups or G
    foe = build_foe(copy.deepcopy(source), FoEConfig(num_groups=H), device=device, timeout_s=timeout_s)
    exact = build_exact(copy.deepcopy(source), FoEConfig(num_groups=max(H, G)), device=device,
                        timeout_s=timeout_s) if max(H, G) % G == 0 else None
    ep = build_ep(copy.deepcopy(source), device=device, timeout_s=timeout_s)
    p = foe.mesh.placement
    runs = {
        "foe": (foe, shard_batch(ids, p.shard_of(rank), p.num_shards)),
        "exact": (exact, ids),
        "ep": (ep, shard_batch(ids, rank, G)),
        "ep_replicated": (ep, ids),
    }
    report = dict(model=model_name, world_size=G, groups=H, tokens=tokens, batch=batch, hidden=d, top_k=k,
                  bytes_per_element=esize, backend=dist.get_backend(), device=str(device), runtimes={})
    for name, (model, inputs) in runs.items():
        if model is None:
            continue
        model(inputs)  # warm-up
        model.ledger.reset()
        start = time.perf_counter()
        for _ in range(repeats):
            model(inputs)
        seconds = (time.perf_counter() - start) / repeats
        t_rank = inputs.numel()
        rows = [dict(r, bytes=r["bytes"] / repeats, seconds=r["seconds"] / repeats, calls=r["calls"] // repeats)
                for r in model.ledger.rows()]
        gathered: list = [None] * G
        dist.all_gather_object(gathered, (rows, seconds))
        report["runtimes"][name] = dict(tokens_per_rank=t_rank, forward_seconds=max(s for _, s in gathered),
                                        formula_bytes_per_layer=_formula(name, k, H, G, p.ranks_per_group) *
                                        t_rank * d * esize, layers=_average(gathered, G))
    return report


def check_bench_args(tokens: int, batch: int, groups: int | None, repeats: int, timeout_s: float | None) -> None:
    """ValueError naming the first bad argument of run_bench (before any model is built)."""
    for name, value in (("tokens", tokens), ("batch", batch), ("groups", groups), ("repeats", repeats)):
        if value is None and name == "groups":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if timeout_s is not None:
        check_seconds(timeout_s, "timeout_s")


def _formula(name: str, k: int, H: int, G: int, s: int) -> float:
    if name == "foe":  # the runtime's intra-group all-to-all carries k/H picks per token
        return all_reduce_volume(min(G, H)) + (ep_volume(k // H, s) if s > 1 else 0.0)
    if name == "exact":
        return exact_volume(k, max(H, G), G)
    return ep_volume(k, G)


def _average(gathered: list, G: int) -> list[dict]:
    table: dict[tuple[int, str], dict] = {}
    for rows, _ in gathered:
        for r in rows:
            t = table.setdefault((r["layer"], r["kind"]), dict(layer=r["layer"], kind=r["kind"], calls=r["calls"],
                                                               bytes=0.0, seconds=0.0))
            t["bytes"] += r["bytes"] / G
            t["seconds"] = max(t["seconds"], r["seconds"])
    return [table[key] for key in sorted(table)]


def format_report(report: dict) -> str:
    lines = [f"{report['model']}: G={report['world_size']} ranks ({report['backend']}, {report['device']}), "
             f"H={report['groups']}, batch {report['batch']}x{report['tokens']} tokens, d={report['hidden']}, "
             f"k={report['top_k']}, fp32; bytes = logical bytes sent per rank (mean over ranks)"]
    for name, r in report["runtimes"].items():
        lines.append(f"\n== {name}: {r['tokens_per_rank']} tokens per rank, forward {1e3 * r['forward_seconds']:.2f} ms"
                     f", formula payload {r['formula_bytes_per_layer']:.0f} B/layer ==")
        lines.append(f"{'layer':>6} {'kind':<16} {'calls':>5} {'bytes':>12} {'ms':>8}")
        for row in r["layers"]:
            layer = "final" if row["layer"] == FINAL else str(row["layer"])
            lines.append(f"{layer:>6} {row['kind']:<16} {row['calls']:>5} {row['bytes']:>12.0f} "
                         f"{1e3 * row['seconds']:>8.3f}")
        payload = [sum(x["bytes"] for x in r["layers"] if x["layer"] == i and x["kind"] in PAYLOAD)
                   for i in sorted({x["layer"] for x in r["layers"]} - {FINAL})]
        lines.append(f"payload per layer: {', '.join(f'{b:.0f}' for b in payload)} B "
                     f"(formula {r['formula_bytes_per_layer']:.0f})")
    return "\n".join(lines)

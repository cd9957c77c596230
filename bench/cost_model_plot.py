"""Calibrate the cost model on the paper's MoE/FoE latency ratios and plot predicted speedup.

Run: python bench/cost_model_plot.py  ->  bench/results/cost_model_speedup.png (+ .json)
Prints the fit per point, and the predicted ratio for 1, 2 and 4 nodes of 8 GPUs (NVLink
900 GB/s, InfiniBand 400 Gb/s = 50 GB/s per GPU unless overridden).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from foe_compile.comm import multinode_speedup_asymptote  # noqa: E402
from foe_compile.distributed.cost_model import (DEFAULT_FREE, PAPER_RATIOS, PAPER_TOKENS, Cluster,  # noqa: E402
                                                ModelDims, calibrate, speedup)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--intra", type=float, default=900.0, help="GB/s per GPU inside a node")
    parser.add_argument("--inter", type=float, default=50.0, help="GB/s per GPU between nodes")
    parser.add_argument("--free", default=",".join(DEFAULT_FREE), help="parameters to fit")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cost_model_speedup"))
    args = parser.parse_args()
    dims, one_node = ModelDims(), Cluster(1, 8, args.intra, args.inter)
    fit = calibrate(dims, one_node, free=tuple(args.free.split(",")))
    print("MoE/FoE forward-latency ratio, paper (8xH100) vs calibrated model:")
    print(fit.table())
    print(f"max relative error {100 * fit.max_rel_error:.1f}%")

    tokens = np.unique(np.logspace(0, np.log10(65536), 120).astype(int))
    curves = {}
    for nodes in (1, 2, 4):
        cluster = replace(one_node, nodes=nodes)
        curves[nodes] = [speedup(float(t), dims, cluster, fit.params) for t in tokens]
        at = {t: speedup(float(t), dims, cluster, fit.params) for t in PAPER_TOKENS}
        print(f"{nodes} node(s), G={cluster.gpus}: " + ", ".join(f"{t}: {v:.2f}x" for t, v in at.items()))
    r = args.intra / args.inter
    print(f"multi-node comm-time asymptote kHr/(kH+r(H-1)) = {multinode_speedup_asymptote(8, 8, r):.2f}x (r={r:g})")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for nodes, ys in curves.items():
        ax.plot(tokens, ys, label=f"model, {nodes} node(s) x 8 GPUs")
    ax.scatter(PAPER_TOKENS, PAPER_RATIOS, color="k", zorder=5, label="paper, 1 node (8xH100)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="tokens per forward", ylabel="MoE (EP) / FoE forward latency",
           title="Predicted FoE speedup (calibrated on the paper's 1-node ratios)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out + ".png", dpi=120)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(params=asdict(fit.params), free=args.free.split(","), tokens=list(fit.tokens),
                       paper=list(fit.target), fitted=list(fit.predicted), max_rel_error=fit.max_rel_error,
                       intra_gbytes_s=args.intra, inter_gbytes_s=args.inter,
                       curves={n: [[int(t), y] for t, y in zip(tokens, ys)] for n, ys in curves.items()}), f, indent=1)
    print(f"wrote {args.out}.png and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

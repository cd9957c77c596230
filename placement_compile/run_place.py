"""The `place` and `evaluate` commands: Bookshelf circuit -> macro placement -> .pl, PNG, metrics JSON."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from placement_compile.bookshelf import Circuit, read_bookshelf, write_pl
from placement_compile.guidance import GuidanceConfig
from placement_compile.legalizer import LegalizerConfig
from placement_compile.macro_view import lift_positions, macro_view
from placement_compile.metrics import (circuit_macro_legality, hpwl_full, hpwl_macro_only, hpwl_normalised,
                                       overlap_area_boxes)
from placement_compile.model import load_model
from placement_compile.sampler import PlaceConfig, place
from placement_compile.to_graph import circuit_to_graph, graph_to_lower_left


def circuit_metrics(circuit: Circuit, lower_left: np.ndarray | None = None) -> dict:
    """Labelled metrics of a placement (lower-left [N, 2], default: the circuit's own) of `circuit`."""
    ll = circuit.positions if lower_left is None else lower_left
    placed = circuit.with_positions(ll)
    view = macro_view(placed)
    graph = circuit_to_graph(view)
    macros = circuit.is_macro
    centres = torch.as_tensor(ll[macros] + circuit.sizes[macros] / 2, dtype=torch.float64)
    return {
        "num_macros": int(macros.sum()),
        "hpwl_full_bookshelf_units": hpwl_full(circuit, ll),
        "hpwl_macro_only_bookshelf_units": hpwl_macro_only(circuit, ll),
        "hpwl_macro_view_normalised": float(hpwl_normalised(graph, graph.positions)),
        "macro_legality": circuit_macro_legality(circuit, ll),
        "macro_overlap_area_bookshelf_units": float(
            overlap_area_boxes(centres, torch.as_tensor(circuit.sizes[macros], dtype=torch.float64))),
    }


def plot_placement(circuit: Circuit, lower_left: np.ndarray, path: Path, title: str) -> None:
    """PNG of the canvas, the macros (blue) and the pads (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    x0, y0, w, h = circuit.canvas
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.add_patch(Rectangle((x0, y0), w, h, fill=False, edgecolor="black", linewidth=1.5))
    macros = np.flatnonzero(circuit.is_macro)
    boxes = [Rectangle(tuple(lower_left[i]), *circuit.sizes[i]) for i in macros]
    ax.add_collection(PatchCollection(boxes, facecolor="tab:blue", edgecolor="navy", alpha=0.6, linewidth=0.5))
    pads = circuit.is_terminal
    centres = lower_left[pads] + circuit.sizes[pads] / 2
    ax.scatter(centres[:, 0], centres[:, 1], s=4, c="tab:red", label="pads")
    margin = 0.05 * max(w, h)
    ax.set_xlim(x0 - margin, x0 + w + margin)
    ax.set_ylim(y0 - margin, y0 + h + margin)
    ax.set_aspect("equal")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_place(args: argparse.Namespace) -> int:
    """placement-compile place: see cli.py for the arguments."""
    times: dict[str, float] = {}
    tic = time.perf_counter()
    circuit = read_bookshelf(args.aux)
    view = macro_view(circuit)
    graph = circuit_to_graph(view)
    model = load_model(args.checkpoint)
    times["read_seconds"] = time.perf_counter() - tic
    cfg = PlaceConfig(samples=args.samples, steps=args.steps, seed=args.seed, progress=not args.quiet,
                      guidance=replace(GuidanceConfig(), steps=args.guidance_steps),
                      legalizer=replace(LegalizerConfig(), steps=args.legalizer_steps))
    result = place(model, graph, cfg)
    times.update({f"{k}_seconds": v for k, v in result.seconds.items()})
    tic = time.perf_counter()
    full_ll = lift_positions(circuit, view, graph_to_lower_left(graph, result.positions))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pl_path = write_pl(circuit, out / f"{circuit.name}.pl", full_ll)
    metrics = circuit_metrics(circuit, full_ll)
    plot_placement(circuit, full_ll, out / f"{circuit.name}.png",
                   f"{circuit.name}: {metrics['num_macros']} macros, legality {metrics['macro_legality']:.4f}")
    times["write_seconds"] = time.perf_counter() - tic
    times["total_seconds"] = sum(times.values())
    report = {
        "circuit": str(args.aux), "checkpoint": str(args.checkpoint), "pl": str(pl_path),
        "config": {"samples": cfg.samples, "steps": cfg.steps, "guidance_steps": cfg.guidance.steps,
                   "legalizer_steps": cfg.legalizer.steps, "seed": cfg.seed},
        "placed": metrics,
        "input_placement": circuit_metrics(circuit),
        "samples": {"best": result.best, "macro_legality": result.legality,
                    "hpwl_macro_view_normalised": result.hpwl, "legalizer_steps_run": result.legalizer_steps},
        "times": times,
    }
    (out / f"{circuit.name}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({"pl": str(pl_path), **metrics, **times}, indent=1))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """placement-compile evaluate: metrics of a .pl (default: the circuit's own) of a circuit."""
    circuit = read_bookshelf(args.aux, pl=args.pl)
    metrics = {"circuit": str(args.aux), "pl": str(args.pl), **circuit_metrics(circuit)}
    text = json.dumps(metrics, indent=1)
    if args.json_out:
        Path(args.json_out).write_text(text)
    print(text)
    return 0

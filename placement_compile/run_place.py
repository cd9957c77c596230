"""The `place` and `evaluate` commands: Bookshelf circuit -> macro placement -> .pl, PNG, metrics JSON."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from placement_compile.bookshelf import Circuit, read_bookshelf, write_pl
from placement_compile.files import atomic_path
from placement_compile.guidance import GuidanceConfig
from placement_compile.legalizer import LegalizerConfig
from placement_compile.macro_view import lift_positions, macro_view
from placement_compile.metrics import (circuit_macro_legality, hpwl_full, hpwl_macro_only, hpwl_normalised,
                                       overlap_area_boxes)
from placement_compile.model import load_model
from placement_compile.sampler import PlaceConfig, PlaceResult, place
from placement_compile.to_graph import circuit_to_graph, graph_to_lower_left


# Legality within this of 1.0 counts as legal (shapely's union areas carry rounding).
LEGAL_TOL = 1e-9


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
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def check_out_dir(out: Path) -> None:
    """Refuse (ValueError) an output directory that cannot be made: an existing file, or under one.

    Runs before any work, so a mistyped --out costs nothing; the directory itself is created
    only when the results are ready to be written.
    """
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} is an existing file; give a directory (it is created if missing)")
        return
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out} cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} cannot be created: {parent} is not writable")


def oversized_macros(circuit: Circuit) -> list[str]:
    """One line per macro wider or taller than the canvas (no legal placement can hold it)."""
    _, _, w, h = circuit.canvas
    big = np.flatnonzero(circuit.is_macro & ((circuit.sizes[:, 0] > w) | (circuit.sizes[:, 1] > h)))
    return [f"macro {circuit.node_names[i]} is {circuit.sizes[i, 0]:g} x {circuit.sizes[i, 1]:g} but the canvas is "
            f"{w:g} x {h:g}" for i in big]


def place_warnings(circuit: Circuit, metrics: dict, result: PlaceResult, cfg: PlaceConfig) -> list[str]:
    """What the user must know about an otherwise complete `place` result (recorded in its JSON)."""
    warnings = []
    if metrics["num_macros"] == 0:
        warnings.append(f"{circuit.name} has no macros (no movable node taller than a row, {circuit.row_height:g}): "
                        f"nothing was placed; the .pl repeats the input placement")
    elif metrics["macro_legality"] < 1 - LEGAL_TOL:
        warnings.append(f"macro legality {metrics['macro_legality']:.6f} < 1: the best of {cfg.samples} samples still "
                        f"has overlapping macros or macros outside the canvas after {result.legalizer_steps} legalizer "
                        f"steps; raise --legalizer-steps or --samples")
    return warnings


def run_place(args: argparse.Namespace) -> int:
    """placement-compile place: see cli.py for the arguments.

    Input mistakes (numbers, files, an --out that is a file, a macro larger than the canvas) are
    refused before any sampling; the .pl, .png and .json appear together and complete, or not at all.
    """
    cfg = PlaceConfig(samples=args.samples, steps=args.steps, seed=args.seed, progress=not args.quiet,
                      guidance=replace(GuidanceConfig(), steps=args.guidance_steps),
                      legalizer=replace(LegalizerConfig(), steps=args.legalizer_steps))
    out = Path(args.out)
    check_out_dir(out)
    times: dict[str, float] = {}
    tic = time.perf_counter()
    circuit = read_bookshelf(args.aux)
    too_big = oversized_macros(circuit)
    if too_big:
        more = f" (and {len(too_big) - 1} more)" if len(too_big) > 1 else ""
        raise ValueError(f"{args.aux}: {too_big[0]}{more}: no legal placement exists; check the .nodes sizes "
                         f"and the .scl rows")
    view = macro_view(circuit)
    graph = circuit_to_graph(view)
    model = load_model(args.checkpoint)
    times["read_seconds"] = time.perf_counter() - tic
    result = place(model, graph, cfg)
    times.update({f"{k}_seconds": v for k, v in result.seconds.items()})
    tic = time.perf_counter()
    full_ll = lift_positions(circuit, view, graph_to_lower_left(graph, result.positions))
    if not np.isfinite(full_ll).all():
        raise RuntimeError("the sampler produced non-finite positions (internal error); nothing was written")
    metrics = circuit_metrics(circuit, full_ll)
    warnings = place_warnings(circuit, metrics, result, cfg)
    out.mkdir(parents=True, exist_ok=True)
    final = {ext: out / f"{circuit.name}.{ext}" for ext in ("json", "png", "pl")}
    with contextlib.ExitStack() as stack:
        # Written under temporary names, renamed on success in reverse order: .pl, .png, then the .json.
        tmp = {ext: stack.enter_context(atomic_path(path)) for ext, path in final.items()}
        write_pl(circuit, tmp["pl"], full_ll)
        plot_placement(circuit, full_ll, tmp["png"],
                       f"{circuit.name}: {metrics['num_macros']} macros, legality {metrics['macro_legality']:.4f}")
        times["write_seconds"] = time.perf_counter() - tic
        times["total_seconds"] = sum(times.values())
        report = {
            "circuit": str(args.aux), "checkpoint": str(args.checkpoint), "pl": str(final["pl"]),
            "config": {"samples": cfg.samples, "steps": cfg.steps, "guidance_steps": cfg.guidance.steps,
                       "legalizer_steps": cfg.legalizer.steps, "seed": cfg.seed},
            "warnings": warnings,
            "placed": metrics,
            "input_placement": circuit_metrics(circuit),
            "samples": {"best": result.best, "macro_legality": result.legality,
                        "hpwl_macro_view_normalised": result.hpwl, "legalizer_steps_run": result.legalizer_steps},
            "times": times,
        }
        tmp["json"].write_text(json.dumps(report, indent=1))
    for warning in warnings:
        print(f"placement-compile place: warning: {warning}", file=sys.stderr)
    print(json.dumps({"pl": str(final["pl"]), **metrics, **times, "warnings": warnings}, indent=1))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """placement-compile evaluate: metrics of a .pl (default: the circuit's own) of a circuit.

    The .pl must place every node of the circuit, and its pads where the circuit's own .pl does.
    """
    circuit = read_bookshelf(args.aux, pl=args.pl, check_fixed=True)
    warnings = [f"{line}: macro legality cannot reach 1.0" for line in oversized_macros(circuit)]
    metrics = {"circuit": str(args.aux), "pl": str(args.pl), **circuit_metrics(circuit), "warnings": warnings}
    text = json.dumps(metrics, indent=1)
    if args.json_out:
        with atomic_path(args.json_out) as tmp:
            tmp.write_text(text)
    for warning in warnings:
        print(f"placement-compile evaluate: warning: {warning}", file=sys.stderr)
    print(text)
    return 0

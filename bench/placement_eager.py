"""Eager baseline of the diffusion macro placer on ibm01 macro-only, B in {1, 8, 32}.

For every B: seconds per phase (denoiser, guidance, legalizer), samples per second (B over the
three phases), peak memory, and the chosen sample's macro-only HPWL (Bookshelf units) and macro
legality. Rows go to `<out>/placement_eager.{csv,json}` with device, commit and step counts.
This is the baseline the placement compiler is measured against (same seeds, same outputs).

    python bench/placement_eager.py                      # paper settings: 1000 steps, m = 20, 20k legalizer
    python bench/placement_eager.py --quick              # CPU-sized: 20 steps, m = 20, 2000 legalizer steps
    python bench/placement_eager.py --device cuda --batches 1 8 32
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from placement_compile.bookshelf import iccad04_aux, read_bookshelf  # noqa: E402
from placement_compile.cli import DEFAULT_CHECKPOINT  # noqa: E402
from placement_compile.guidance import GuidanceConfig  # noqa: E402
from placement_compile.legalizer import LegalizerConfig  # noqa: E402
from placement_compile.macro_view import lift_positions, macro_view  # noqa: E402
from placement_compile.metrics import circuit_macro_legality, hpwl_macro_only  # noqa: E402
from placement_compile.model import load_model  # noqa: E402
from placement_compile.sampler import PlaceConfig, place  # noqa: E402
from placement_compile.to_graph import circuit_to_graph, graph_to_lower_left  # noqa: E402


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak RSS (monotone)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_rows(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "placement_eager.json").write_text(json.dumps(rows, indent=1))
    with open(out / "placement_eager.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run(args: argparse.Namespace) -> list[dict]:
    """One row per B, written to args.out as soon as it is measured."""
    device = torch.device(args.device)
    circuit = read_bookshelf(iccad04_aux(args.circuit))
    view = macro_view(circuit)
    graph = circuit_to_graph(view).to(device)
    model = load_model(args.checkpoint).to(device)
    commit, rows = _commit(), []
    for batch in args.batches:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cfg = PlaceConfig(samples=batch, steps=args.steps, seed=args.seed, progress=not args.quiet,
                          guidance=replace(GuidanceConfig(), steps=args.guidance_steps),
                          legalizer=replace(LegalizerConfig(), steps=args.legalizer_steps))
        result = place(model, graph, cfg)
        lower_left = lift_positions(circuit, view, graph_to_lower_left(graph, result.positions.cpu()))
        sampling = sum(result.seconds[k] for k in ("denoiser", "guidance", "legalizer"))
        rows.append({
            "circuit": f"{args.circuit} macro-only", "device": str(device), "threads": torch.get_num_threads(),
            "commit": commit, "B": batch, "steps": args.steps, "guidance_steps": args.guidance_steps,
            "legalizer_budget": args.legalizer_steps, "legalizer_steps_run": result.legalizer_steps,
            "denoiser_s": round(result.seconds["denoiser"], 3), "guidance_s": round(result.seconds["guidance"], 3),
            "legalizer_s": round(result.seconds["legalizer"], 3), "total_s": round(sampling, 3),
            "samples_per_s": round(batch / sampling, 4), "peak_memory_mb": round(_peak_memory_mb(device), 1),
            "hpwl_macro_only_bookshelf": round(hpwl_macro_only(circuit, lower_left), 1),
            "macro_legality": round(circuit_macro_legality(circuit, lower_left), 6),
        })
        print(json.dumps(rows[-1]), flush=True)
        write_rows(rows, Path(args.out))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--circuit", default="ibm01")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--guidance-steps", type=int, default=20)
    parser.add_argument("--legalizer-steps", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="20 diffusion steps, 2000 legalizer steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (shared boxes: keep 1)")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.legalizer_steps = 20, 2000
    torch.set_num_threads(args.threads)
    run(args)
    print(f"wrote {Path(args.out) / 'placement_eager.csv'} and .json")


if __name__ == "__main__":
    main()

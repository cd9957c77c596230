"""Benchmark rows -> CSV, JSON, a PNG (latency vs T per implementation, with the floor) and a
short text table. Also a CLI to re-print the table of a saved run:

    python bench/report.py bench/results/bench_gpu.json
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

BASELINE = {"experts": "grouped_mm", "layer": "grouped_mm", "route": "reference"}
OURS = {"experts": ("triton", "native", "cupy"), "layer": ("foe", "foe-triton"), "route": ("native", "cupy", "triton")}


def machine_meta(device: str, dtype: torch.dtype) -> dict:
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    with contextlib.suppress(ImportError):
        import triton
        versions["triton"] = triton.__version__
    return {"device": name, "dtype": str(dtype).removeprefix("torch."), "versions": versions,
            "commit": os.environ.get("FOE_COMMIT") or commit or "unknown"}


def with_ratios(rows: list[dict]) -> list[dict]:
    """Add speedup = baseline median / median (same op, layer, T and graph mode) and x_floor."""
    index = {(r["op"], r["layer"], r["T"], r["graph"], r["impl"]): r for r in rows}
    out = []
    for r in rows:
        base = index.get((r["op"], r["layer"], r["T"], r["graph"], BASELINE[r["op"]]))
        out.append(dict(r, baseline=BASELINE[r["op"]], speedup=base["median_ms"] / r["median_ms"] if base else None,
                        x_floor=r["median_ms"] / r["floor_ms"]))
    return out


def write(rows: list[dict], meta: dict, out_dir: str | Path, tag: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(r, device=meta["device"], commit=meta["commit"]) for r in with_ratios(rows)]
    paths = [out_dir / f"bench_{tag}.json", out_dir / f"bench_{tag}.csv"]
    paths[0].write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png = plot(rows, meta, out_dir / f"bench_{tag}.png")
    return paths + ([png] if png else [])


def plot(rows: list[dict], meta: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ops, layers = sorted({r["op"] for r in rows}), sorted({r["layer"] for r in rows})
    fig, axes = plt.subplots(len(ops), len(layers), figsize=(4.2 * len(layers), 3.4 * len(ops)), squeeze=False)
    for ax, (op, layer) in zip(axes.flat, [(o, lay) for o in ops for lay in layers]):
        mine = [r for r in rows if r["op"] == op and r["layer"] == layer]
        if not mine:
            ax.axis("off")
            continue
        for impl, graph in sorted({(r["impl"], r["graph"]) for r in mine}):
            pts = sorted((r["T"], r["median_ms"]) for r in mine if r["impl"] == impl and r["graph"] == graph)
            ax.plot(*zip(*pts), marker="o", ls="--" if graph else "-", label=impl + (" (graph)" if graph else ""))
        floor = sorted({(r["T"], r["floor_ms"]) for r in mine})
        ax.plot(*zip(*floor), color="k", lw=2, label="floor")
        ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="median ms", title=f"{op}: {layer}")
        ax.legend(fontsize=6)
    fig.suptitle(f"{meta['device']} {meta['dtype']} @ {meta['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(rows: list[dict], meta: dict | None = None) -> str:
    """One line per (op, layer, T, graph): our best implementation (and the Triton one) vs the
    baseline (grouped_mm; the reference for route) and the floor; speedup = baseline / ours."""
    rows = with_ratios(rows)
    lines = []
    if meta:
        c = meta.get("ceilings", {})
        lines.append(f"{meta['device']} {meta['dtype']} commit {meta['commit']}  copy {c.get('copy_GBps', 0):.4g} GB/s"
                     f"  gemm {c.get('gemm_TFLOPs', 0):.4g} TFLOP/s  auto {meta.get('auto_backends')}")
        lines += [f"launch configs {layer}: {src}" for layer, src in meta.get("launch_configs", {}).items()]
    lines.append(f"{'op':7} {'layer':8} {'T':>5} {'mode':5} {'ours':>10} {'impl':>10} {'triton':>9} {'baseline':>9}"
                 f" {'floor':>8} {'speedup':>7} {'x floor':>7}")
    keys = sorted({(r["op"], r["layer"], r["T"], r["graph"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2], k[3]))
    for op, layer, T, graph in keys:
        group = [r for r in rows if (r["op"], r["layer"], r["T"], r["graph"]) == (op, layer, T, graph)]
        ours = [r for r in group if r["impl"] in OURS[op]]
        base = next((r for r in group if r["impl"] == BASELINE[op]), None)
        if not ours:
            continue
        best = min(ours, key=lambda r: r["median_ms"])
        triton = next((r["median_ms"] for r in group if r["impl"] in ("triton", "foe-triton")), float("nan"))
        speed = f"{best['speedup']:.2f}x" if best["speedup"] else "-"
        lines.append(f"{op:7} {layer:8} {T:>5} {'graph' if graph else 'eager':5} {best['median_ms']:>10.4f}"
                     f" {best['impl']:>10} {triton:>9.4f} {base['median_ms'] if base else float('nan'):>9.4f}"
                     f" {best['floor_ms']:>8.4f} {speed:>7} {best['x_floor']:>7.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    print(summary(data["rows"], data["meta"]))

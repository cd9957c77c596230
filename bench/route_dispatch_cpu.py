"""C++ route/dispatch (foe::sum_route_dispatch_native) vs the plain-PyTorch reference on CPU, fp32.

Shapes: Qwen3-30B-A3B (d=2048, E=128, k=8, H=4) and OLMoE (d=2048, E=64, k=8, H=8), T in
{1, 64, 512, 4096}, residual [1, T, d]. The two implementations are timed interleaved (the CPU is
shared), medians over repetitions; GB/s counts the compulsory bytes (inputs read once, outputs
written once). Goal (issue 4): native >= 3x faster than the reference at T = 512.
Run: python bench/route_dispatch_cpu.py [--threads N] [--hidden D] [--out bench/results/route_dispatch_cpu.json]
--hidden 16 shrinks d so that softmax/top-k/placement dominate (at d=2048 they are ~10% of the op): the
setting to time a change to the routing step itself.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

from foe_compile.kernels import native, reference

LAYERS = {"qwen3": dict(d=2048, E=128, k=8, H=4), "olmoe": dict(d=2048, E=64, k=8, H=8)}
TOKENS = (1, 64, 512, 4096)


def compulsory_bytes(T: int, d: int, E: int, k: int, H: int) -> int:
    """fp32 inputs (residual, partials, norm and router weights) + outputs (r, xn, ids, weights, pairs, offsets)."""
    return 4 * ((1 + H) * T * d + d + E * d) + 4 * 2 * T * d + 8 * T * k + 4 * T * k + 8 * T * k + 8 * (E + 1)


def time_interleaved(fns: dict, budget_s: float, min_reps: int = 5, max_reps: int = 200) -> dict[str, float]:
    """Median seconds per call of each fn, alternating calls until the budget or max_reps is used."""
    for fn in fns.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while len(samples[next(iter(fns))]) < max_reps and (
            len(samples[next(iter(fns))]) < min_reps or time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/route_dispatch_cpu.json")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per row")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--hidden", type=int, default=None, help="override d (e.g. 16: routing-bound)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if native.UNAVAILABLE_REASON is not None:
        raise SystemExit(native.UNAVAILABLE_REASON)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for name, shape in LAYERS.items():
        shape = dict(shape, d=args.hidden or shape["d"])
        d, E, k, H = shape["d"], shape["E"], shape["k"], shape["H"]
        for T in TOKENS:
            g = torch.Generator().manual_seed(T)
            inputs = (torch.randn(1, T, d, generator=g), torch.randn(H, T, d, generator=g),
                      1 + 0.1 * torch.randn(d, generator=g), 1e-6, torch.randn(E, d, generator=g) / d ** 0.5, H, k, True)
            medians = time_interleaved({"reference": lambda: reference.sum_route_dispatch(*inputs),
                                        "native": lambda: torch.ops.foe.sum_route_dispatch_native(*inputs)},
                                       args.budget)
            nbytes = compulsory_bytes(T, d, E, k, H)
            for impl, seconds in medians.items():
                rows.append(dict(bench="route_dispatch_cpu", device=platform.processor() or platform.machine(),
                                 threads=torch.get_num_threads(), dtype="float32", layer=name, T=T, **shape,
                                 impl=impl, median_ms=seconds * 1e3, gb_per_s=nbytes / seconds / 1e9, commit=commit,
                                 torch=torch.__version__))
            speedup = medians["reference"] / medians["native"]
            print(f"{name:6s} d={d} T={T:5d} threads={args.threads}  reference {medians['reference'] * 1e3:9.3f} ms  native "
                  f"{medians['native'] * 1e3:9.3f} ms ({nbytes / medians['native'] / 1e9:5.2f} GB/s)  "
                  f"speedup {speedup:5.2f}x", flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Tune the Triton experts kernels' launch configurations on this GPU and write them as JSON.

Coordinate search under a time budget: start from the current configuration (shipped file or
the fallback rule), try each knob's values in turn, keep a change when the median latency
(CUDA events, back-to-back calls) improves by more than 2%. Candidates that fail to compile
(e.g. too much shared memory) or disagree with the starting configuration's output are dropped.
Files are named by `launch_configs.config_filename` (the runtime's naming function), so the
runtime picks them up from --out-dir when FOE_CONFIG_DIR points there, or from the package when
written into foe_compile/kernels/configs/.

    python bench/tune_experts.py --budget-s 90 --out-dir /tmp/configs
    python bench/tune_experts.py --rows mixtral:64,qwen3:4096 --budget-s 60   # only these rows
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import cases  # noqa: E402
from foe_compile.kernels import launch_configs, triton_experts  # noqa: E402

KNOBS = [  # (path into the config, values)
    (("BLOCK_M",), (16, 32, 64, 128)),
    (("gate_up", "BLOCK_N"), (32, 64, 128, 256)),
    (("down", "BLOCK_N"), (32, 64, 128, 256)),
    (("gate_up", "BLOCK_K"), (64, 128)),
    (("down", "BLOCK_K"), (64, 128)),
    (("gate_up", "num_warps"), (4, 8)),
    (("down", "num_warps"), (4, 8)),
    (("gate_up", "num_stages"), (3, 4, 5)),
    (("down", "num_stages"), (3, 4, 5)),
    (("gate_up", "GROUP_M"), (1, 8)),
]
ORDER = (1, 4096, 64, 512, 8)  # decode and long prefill first: the rows the goals are about


def with_value(cfg: dict, path: tuple[str, ...], value: int) -> dict:
    new = copy.deepcopy(cfg)
    slot = new
    for key in path[:-1]:
        slot = slot[key]
    slot[path[-1]] = value
    if path == ("gate_up", "GROUP_M"):
        new["down"]["GROUP_M"] = value
    return new


def median_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[reps // 2]


def tune_one(layer: cases.Layer, T: int, start: dict, deadline: float) -> tuple[dict, float, float]:
    """(best config, its ms, the starting config's ms) for one layer shape and T."""
    gate_up, down, _, _ = cases.weights(layer)
    a = cases.inputs(layer, T)
    args = (a["x"], gate_up, down, a["ids"], a["weights"], a["pairs"], a["offsets"], layer.H)
    expected = triton_experts.experts_swiglu(*args, config=start)
    best, best_ms = start, median_ms(lambda: triton_experts.experts_swiglu(*args, config=start))
    start_ms = best_ms
    m = T * layer.k / layer.E
    for path, values in KNOBS:
        for value in values:
            if time.monotonic() > deadline:
                return best, best_ms, start_ms
            if path == ("BLOCK_M",) and value > max(16, 4 * m):
                continue  # blocks mostly padding
            cand = with_value(best, path, value)
            if cand == best:
                continue
            try:
                out = triton_experts.experts_swiglu(*args, config=cand)
                torch.testing.assert_close(out, expected, atol=3e-2, rtol=2e-2)
                ms = median_ms(lambda: triton_experts.experts_swiglu(*args, config=cand))
            except Exception as err:  # noqa: BLE001 - a candidate that cannot run is just dropped
                print(f"  skip {path}={value}: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
                continue
            if ms < best_ms * 0.98:
                best, best_ms = cand, ms
    return best, best_ms, start_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default=",".join(cases.GPU_LAYERS))
    p.add_argument("--tokens", default=",".join(map(str, ORDER)))
    p.add_argument("--rows", default="", help="layer:T pairs to tune, e.g. mixtral:64,qwen3:4096 "
                                               "(replaces the --layers x --tokens grid)")
    p.add_argument("--budget-s", type=float, default=90.0, help="total wall-clock budget")
    p.add_argument("--out-dir", default=str(launch_configs.CONFIG_DIR))
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_experts.py needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    if args.rows:
        pairs = [(row.split(":")[0], int(row.split(":")[1])) for row in args.rows.split(",")]
    else:
        pairs = [(n, int(t)) for t in args.tokens.split(",") for n in args.layers.split(",")]
    unknown = sorted({n for n, _ in pairs} - set(cases.GPU_LAYERS))
    if unknown:
        sys.exit(f"unknown layer(s) {unknown}; choose from {sorted(cases.GPU_LAYERS)}")
    names = sorted({n for n, _ in pairs})
    deadline0 = time.monotonic() + args.budget_s
    found: dict[str, dict[int, dict]] = {n: {} for n in names}
    for i, (name, T) in enumerate(pairs):
        layer = cases.Layer(name, *cases.GPU_LAYERS[name], 1, dtype, "cuda")
        share = (deadline0 - time.monotonic()) / (len(pairs) - i)
        if share <= 0:
            break
        start = launch_configs.get_config(layer.E, layer.I, layer.d, layer.k, T, dtype, device)
        best, ms, ms0 = tune_one(layer, T, start, time.monotonic() + share)
        found[name][T] = best
        print(f"{name:8} T={T:5}: {ms0:.4f} -> {ms:.4f} ms  {best}", flush=True)
    dev = launch_configs.device_name(device)
    for name, tuned in found.items():
        if not tuned:
            continue
        d, I, E, k = cases.GPU_LAYERS[name]
        table = {T: launch_configs.get_config(E, I, d, k, T, dtype, device) for T in cases.GPU_TOKENS}
        table.update(tuned)
        path = Path(args.out_dir) / launch_configs.config_filename(E, I, d, dtype, dev)
        launch_configs.write_configs(path, table, untuned=False,
                                     note=f"bench/tune_experts.py, {args.budget_s:.0f} s budget; tuned T = "
                                          f"{sorted(tuned)}, other keys kept from the previous configuration")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""`foe-compile` command line: convert a model, or run the offline demo.

A user mistake (a bad number, a missing or broken model directory, an output that cannot be
written) prints one line, `error: <what to do>`, and exits with code 2, before any work is done
where it can be checked up front. Internal bugs raise with their traceback.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable

import torch

from .builtin import BUILTIN, TINY, builtin_model
from .config import FoEConfig
from .convert import convert
from .families import FAMILIES, is_supported_family

EXACT_MAX_REL = 1e-5  # fp32 exact-mode tolerance (summation order only)
RANK_ERROR_GRACE_S = 10.0  # how long ranks other than 0 wait before reporting a user mistake themselves


class UsageError(Exception):
    """A user mistake: main() prints `error: <message>` and exits with code 2 (no traceback)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one `error: ...` line (through UsageError) instead of usage + message."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


positive_int, non_negative_int = _int_at_least(1), _int_at_least(0)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def read_config_json(directory: str) -> dict:
    """config.json of a model directory, or UsageError saying what is wrong with it."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"{directory} has no config.json; give a Hugging Face model directory "
                         f"(what save_pretrained writes) or a built-in model ({', '.join(sorted(BUILTIN))})")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise UsageError(f"{path} is not valid JSON ({_one_line(err)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_source(name_or_path: str, dtype: torch.dtype):
    if name_or_path in BUILTIN:
        return builtin_model(name_or_path, dtype=dtype)
    if not os.path.isdir(name_or_path):
        raise UsageError(f"{name_or_path!r} is neither a local model directory nor a built-in model "
                         f"({', '.join(sorted(BUILTIN))})")
    foe = read_config_json(name_or_path).get("foe")
    if foe is not None:
        settings = f" (mode={foe.get('mode')!r}, num_groups={foe.get('num_groups')!r})" if isinstance(foe, dict) else ""
        raise UsageError(f"{name_or_path} is already a converted model{settings}: config.json has a 'foe' section. "
                         f"Load it with foe_compile.from_pretrained({name_or_path!r}), or convert its source model")
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, local_files_only=True).eval()
    except (OSError, ValueError, SafetensorError) as err:
        raise UsageError(f"cannot load a model from {name_or_path}: {_one_line(err)}") from None


def check_outputs(args: argparse.Namespace, *flags: str) -> None:
    """Refuse output paths that cannot be written, before any work is done."""
    for flag in flags:
        path = getattr(args, flag.lstrip("-").replace("-", "_"))
        if path is None:
            continue
        if flag == "--out":
            if os.path.exists(path) and not os.path.isdir(path):
                raise UsageError(f"--out {path} exists and is not a directory; give a directory (a new one, or a "
                                 f"saved model's to overwrite)")
            ancestor = os.path.dirname(os.path.abspath(path))
            while not os.path.exists(ancestor):
                ancestor = os.path.dirname(ancestor)
            if not os.path.isdir(ancestor):
                raise UsageError(f"--out {path}: {ancestor} is a file, so the directory cannot be created")
            continue
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a directory; give a file path")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise UsageError(f"{flag} {path}: the directory {parent} does not exist")


def on_meta(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def calibration_tokens(model, count: int, seed: int) -> torch.Tensor | None:
    if count <= 0 or on_meta(model):
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, count), generator=g)


def cmd_convert(args: argparse.Namespace) -> int:
    check_outputs(args, "--out", "--report-json", "--onnx", "--aoti")
    model = load_source(args.source, getattr(torch, args.dtype))
    writes = [flag for flag in ("--out", "--onnx", "--aoti") if getattr(args, flag[2:])]
    if args.out and not is_supported_family(model):
        raise UsageError(f"--out saves models converted at module level ({sorted(FAMILIES)}); "
                         f"{getattr(model.config, 'model_type', type(model).__name__)} goes through the FX path, whose "
                         "result (a captured graph) has no Hugging Face layout to save: export it with --onnx or --aoti")
    if writes and on_meta(model):
        raise UsageError(f"{' and '.join(writes)} {'needs' if len(writes) == 1 else 'need'} real weights; the built-in "
                         f"full-size configs are on the meta device (structure only): use a *-tiny built-in or a "
                         f"model directory")
    try:
        config = FoEConfig(mode=args.mode, num_groups=args.groups, expert_assignment=args.assignment,
                           report_gpus=args.gpus)
        vocab = model.config.vocab_size
        model, report = convert(model, config, calibration_inputs=calibration_tokens(model, args.calibration_tokens,
                                                                                     args.seed))
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(report.to_table())
    if args.report_json:
        with open(args.report_json, "w") as f:
            f.write(report.to_json())
    if args.out:
        try:
            model.save_pretrained(args.out)
        except OSError as err:
            raise UsageError(f"cannot save to {args.out}: {_one_line(err)}") from None
        print(f"saved the converted model to {args.out} (source layout + config.foe)")
    if args.onnx or args.aoti:
        export_converted(model, vocab, args)
    return 0


def export_converted(model, vocab: int, args: argparse.Namespace) -> None:
    from .export import to_aoti, to_onnx

    example = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(args.seed))
    if args.onnx:
        try:
            written = to_onnx(model, example, args.onnx)
        except torch.onnx.errors.OnnxExporterError as err:  # an op of the model torch.onnx cannot translate
            raise UsageError(f"ONNX export failed: {_one_line(err)}") from None
        print(f"wrote {written} (ONNX, standard operators; batch and length dynamic)")
    if args.aoti:
        print(f"wrote {to_aoti(model, example, args.aoti)} (AOTInductor package; load with foe_compile.export.load_aoti)")


@torch.no_grad()
def cmd_demo(args: argparse.Namespace) -> int:
    """Every supported family, offline: convert in both modes, verify exact mode, print reports."""
    failures = []
    for name in TINY:
        source = builtin_model(name, seed=args.seed)
        ids = calibration_tokens(source, args.calibration_tokens, args.seed)
        reference = source(ids).logits
        for mode in ("exact", "foe"):
            model, report = convert(copy.deepcopy(source), mode=mode, calibration_inputs=ids,
                                    report_gpus=args.gpus)
            print(f"\n== {name} ({type(source).__name__}), mode={mode} ==")
            print(report.to_table())
            if mode == "exact":
                err = float((model(ids).logits - reference).abs().max() / reference.abs().max())
                ok = err <= EXACT_MAX_REL
                print(f"exact-mode check: max relative logit error {err:.2e} "
                      f"({'OK' if ok else 'FAILED'}, tolerance {EXACT_MAX_REL:.0e})")
                if not ok:
                    failures.append(name)
    print("\n== full-size configs on the meta device (structure only, no memory) ==")
    for name, groups in (("qwen3-30b-a3b", None), ("olmoe-1b-7b", None), ("mixtral-8x7b", 2)):
        start = time.perf_counter()
        _, report = convert(builtin_model(name), num_groups=groups, report_gpus=args.gpus)
        c = report.communication
        print(f"{name:>14}: H={report.num_groups} converted in {time.perf_counter() - start:.2f} s; per layer on "
              f"{c.gpus} GPUs: EP {c.ep_per_layer:.2f} vs FoE {c.foe_per_layer:.2f} T*d "
              f"(EP/FoE = {c.ep_per_layer / c.foe_per_layer:.2f})")
    if failures:
        print(f"\nexact mode FAILED for {failures}", file=sys.stderr)
        return 1
    print("\nexact mode verified for every family")
    return 0


def cmd_distributed_bench(args: argparse.Namespace) -> int:
    """Under torchrun: FoE vs EP vs exact, per-layer counted bytes and times (rank 0 prints)."""
    import json

    import torch.distributed as dist

    from .distributed.bench import format_report, run_bench
    from .distributed.launch import init_from_env

    check_outputs(args, "--json")
    try:
        device = init_from_env(timeout_s=args.timeout)
        report = run_bench(args.model, args.tokens, args.batch or dist.get_world_size(), args.groups, args.repeats,
                           args.seed, device, timeout_s=args.timeout)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if dist.get_rank() == 0:
        print(format_report(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    dist.destroy_process_group()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="foe-compile", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a local Hugging Face model directory or a built-in config")
    conv.add_argument("source", help=f"model directory or one of: {', '.join(sorted(BUILTIN))}")
    conv.add_argument("--mode", choices=["foe", "exact"], default="foe")
    conv.add_argument("--groups", type=positive_int, default=None, help="H (default: from the KV-head count)")
    conv.add_argument("--assignment", choices=["contiguous", "calibrated"], default="contiguous")
    conv.add_argument("--calibration-tokens", type=non_negative_int, default=256,
                      help="random tokens to measure with (0: none)")
    conv.add_argument("--gpus", type=positive_int, default=8, help="G for the communication report")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    conv.add_argument("--seed", type=int, default=0)
    conv.add_argument("--out", help="save the converted model here")
    conv.add_argument("--report-json", help="write the report as JSON here")
    conv.add_argument("--onnx", help="export the converted model to this ONNX file")
    conv.add_argument("--aoti", help="compile the converted model into this AOTInductor package (.pt2)")
    conv.set_defaults(func=cmd_convert)
    demo = sub.add_parser("demo", help="offline demo over every supported family")
    demo.add_argument("--calibration-tokens", type=positive_int, default=64)
    demo.add_argument("--gpus", type=positive_int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser("distributed-bench", help="FoE vs EP vs exact bytes and times per layer (run via "
                           "torchrun --nproc-per-node G -m foe_compile.cli distributed-bench)")
    bench.add_argument("--model", choices=TINY, default="olmoe-tiny")
    bench.add_argument("--tokens", type=positive_int, default=64, help="tokens per sequence")
    bench.add_argument("--batch", type=positive_int, default=None, help="sequences (default: the world size)")
    bench.add_argument("--groups", type=positive_int, default=None, help="H (default: the world size)")
    bench.add_argument("--repeats", type=positive_int, default=3)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--timeout", type=positive_seconds, default=120.0, help="collective timeout, seconds")
    bench.add_argument("--json", help="write the report as JSON here (rank 0)")
    bench.set_defaults(func=cmd_distributed_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as err:
        if os.environ.get("RANK", "0") != "0":
            # Under torchrun every rank usually makes the same mistake: rank 0 says it, and torchrun
            # stops this rank when rank 0 exits. Say it here too only if that has not happened.
            time.sleep(RANK_ERROR_GRACE_S)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())

"""`placement-compile` command line: place, evaluate, train, generate.

    placement-compile place ibm01 --out out/ibm01
    placement-compile evaluate ibm01 out/ibm01/ibm01.pl
    placement-compile place ../shared/data/iccad04/ibm02/ibm02.aux --out out/ibm02
    placement-compile generate data/v1-train --circuits 2000 --version v1 --workers 2
    placement-compile train runs/small --data data/v1-train --val data/v1-val --steps 10000

A user mistake (a nonsensical number, a missing, broken or mismatched file, an --out that is a
file) prints one line `placement-compile <command>: error: ...` and exits with status 2, with
no traceback; internal errors still raise.

A circuit is the path of its .aux or the name of a circuit shipped in the package (ibm01; see
builtin_circuits.py); an existing file wins over a built-in name.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from placement_compile.builtin_circuits import BUILTIN_CIRCUITS, resolve_circuit

DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "small.pt"
# NOTE: on the shared 2-core box the ibm01 demo took 3 min 9 s with torch's default 2 threads and
# 51 s with 1 (same output): the per-step tensors are small and two threads contend. Default 1.
THREADS_HELP = "torch CPU threads (0: torch's default; 1 is fastest on small shared machines)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (`prog: error: ...`), not the usage text plus it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    """argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


POSITIVE, NON_NEGATIVE = _int_at_least(1), _int_at_least(0)


def _add_place(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("place", help="place the macros of a Bookshelf circuit")
    p.add_argument("aux", help=f"the circuit's .aux file (.gz files are read transparently) or a built-in "
                               f"circuit ({', '.join(BUILTIN_CIRCUITS)})")
    p.add_argument("--samples", type=POSITIVE, default=8, help="B candidates sampled in one batch")
    p.add_argument("--steps", type=POSITIVE, default=100, help="diffusion steps (the paper uses 1000)")
    p.add_argument("--guidance-steps", type=NON_NEGATIVE, default=20, help="inner guidance Adam steps m (0: none)")
    p.add_argument("--legalizer-steps", type=NON_NEGATIVE, default=5000,
                   help="legalizer step budget (paper: 20000; 0: no legalization)")
    p.add_argument("--out", default="out", help="output directory (created if missing)")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="denoiser weights")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--threads", type=NON_NEGATIVE, default=1, help=THREADS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics of a .pl placement of a circuit")
    p.add_argument("aux", help=f"the circuit's .aux file or a built-in circuit ({', '.join(BUILTIN_CIRCUITS)})")
    p.add_argument("pl", nargs="?", help="placement to score (default: the circuit's own .pl)")
    p.add_argument("--json", dest="json_out", help="also write the metrics here")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from placement_compile.train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train the denoiser on synthetic circuits (resumable)")
    p.add_argument("run_dir", help="checkpoint directory (last.pt, model.pt, loss.png, log.json)")
    p.add_argument("--data", required=True, help="training set written by `generate`")
    p.add_argument("--val", help="held-out set written by `generate` (validation loss)")
    p.add_argument("--model", default=d.model, choices=["small", "medium", "large"])
    p.add_argument("--steps", type=POSITIVE, default=d.steps)
    p.add_argument("--batch", type=POSITIVE, default=d.batch, help="noisy copies per step")
    p.add_argument("--lr", type=_positive_float, default=d.lr)
    p.add_argument("--seed", type=NON_NEGATIVE, default=d.seed)
    p.add_argument("--val-every", type=POSITIVE, default=d.val_every)
    p.add_argument("--ckpt-every", type=POSITIVE, default=d.ckpt_every)
    p.add_argument("--threads", type=NON_NEGATIVE, default=1, help=THREADS_HELP)
    p.add_argument("--resume", action="store_true", help="continue from run_dir/last.pt")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a synthetic training set")
    p.add_argument("out_dir")
    p.add_argument("--circuits", type=POSITIVE, default=1000)
    p.add_argument("--version", default="v1", choices=["v1", "v2"])
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--workers", type=POSITIVE, default=1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="placement-compile", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_place, _add_evaluate, _add_train, _add_generate):
        add(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from placement_compile.synthetic import load_dataset
    from placement_compile.train import TrainConfig, train

    _set_threads(args.threads)
    cfg = TrainConfig(model=args.model, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                      val_every=args.val_every, ckpt_every=args.ckpt_every)
    val = load_dataset(args.val) if args.val else []
    summary = train(load_dataset(args.data), val, args.run_dir, cfg, resume=args.resume)
    print(json.dumps(summary))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from placement_compile.synthetic import generate_dataset

    paths = generate_dataset(args.out_dir, args.circuits, args.version, args.seed, args.workers)
    print(f"wrote {args.circuits} {args.version} circuits in {len(paths)} shard(s) to {args.out_dir}")
    return 0


def _set_threads(threads: int) -> None:
    if threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)


def cmd_place(args: argparse.Namespace) -> int:
    from placement_compile.run_place import run_place

    _set_threads(args.threads)
    args.aux = resolve_circuit(args.aux)
    return run_place(args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from placement_compile.run_place import run_evaluate

    args.aux = resolve_circuit(args.aux)
    return run_evaluate(args)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 with one `error:` line for a user mistake)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # argparse: --help (0) or a usage mistake (2, its line already printed)
        return int(done.code or 0)
    handlers = {"place": cmd_place, "evaluate": cmd_evaluate, "train": cmd_train, "generate": cmd_generate}
    try:
        return handlers[args.command](args)
    except (ValueError, OSError) as err:  # bad input and unusable files; anything else is a bug and raises
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"placement-compile {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Which Hugging Face MoE families convert() handles, measured: one row per family of the
installed transformers (foe_compile.hf_zoo), tiny random weights, fp32, CPU.

Per family: build the tiny model, record its logits at two shapes ([2, 7] and [1, 5] random
token ids, fixed seed) before anything is converted, then for mode="exact" and mode="foe"
convert a deep copy with `convert(copy, mode=..., calibration_inputs=ids_2x7)`, run what it
returns at both shapes and measure max |logits - source| / max |source| at each. A family is
"exact" only when convert succeeded and both errors are <= 1e-5; a report that says exact with
a larger measured error is a silent wrong result and is flagged.

Each family runs in its own subprocess (a crash or hang loses one row, never the sweep) with a
per-attempt alarm and a per-family wall-clock limit; --jobs families run at once. The workers
import a snapshot of foe_compile/ (and run a copy of this script) made when the sweep starts, so
files edited during a long sweep do not mix two versions of the converter in one table (the table names the snapshot:
commit plus a hash of the uncommitted diff).

Run:   python bench/family_coverage.py                       # all families, 2 workers
       python bench/family_coverage.py --families mixtral,gpt_oss
       python bench/family_coverage.py --render               # re-render the .md from the .json
Writes bench/measured/family_coverage.json and .md (--out-dir to change).
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import copy
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from family_coverage_report import (EXACT_TOL, MODES, ROOT, category, claims_exact, fmt_err, markdown, verdict,
                                    write_readme)

SHAPES = {"2x7": (2, 7), "1x5": (1, 5)}  # calibration / capture shape first
SEED = 0


# ---------------------------------------------------------------------------------------------
# The worker: one family, in its own process

class AttemptTimeout(Exception):
    """One convert attempt ran past --timeout (raised by the SIGALRM handler below)."""


def _alarm(seconds: int):
    def handler(signum, frame):
        raise AttemptTimeout(f"attempt exceeded {seconds} s")
    signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)


def _short_path(filename: str) -> str:
    """foe_compile/... or transformers/... (the snapshot and venv prefixes dropped)."""
    for package in ("foe_compile/", "transformers/", "torch/"):
        if f"/{package}" in filename:
            return package + filename.rsplit(f"/{package}", 1)[1]
    return filename


def _error_fields(exc: BaseException) -> dict:
    """Exception type, first line (200 chars), a longer excerpt, the innermost foe_compile frame,
    and for torch.export errors the model-code line it blames."""
    text = str(exc).strip()
    if exc.__cause__ is not None:  # a converter error wrapping torch's: keep torch's text for the category
        text += f"\n[caused by {type(exc.__cause__).__name__}] {str(exc.__cause__).strip()}"
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/foe_compile/" in f.filename]
    where = lambda f: f"{_short_path(f.filename)}:{f.lineno} {f.name}"  # noqa: E731
    blamed = re.search(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in (\w+)\s*\n\s*(.*)',
                       text)
    caused = re.search(r"Caused by: \(([^)]*)\)", text)
    cause = (f"{_short_path(blamed[1])}:{blamed[2]} {blamed[3]}: {blamed[4].strip()}" if blamed
             else caused[1] if caused else None)
    return {"error_type": type(exc).__name__, "error": (text.splitlines() or [""])[0][:200],
            "error_detail": text[:3000], "where_foe": where(ours[-1]) if ours else None, "cause": cause}


def _logits(out):
    import torch
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    return next(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _run(model, ids):
    """The source's calling convention for a Hugging Face model; positional ids for the FX path."""
    from transformers import PreTrainedModel
    if isinstance(model, PreTrainedModel):
        return _logits(model(input_ids=ids, use_cache=False))
    return _logits(model(ids))


def _foe_op_counts(model) -> dict[str, int]:
    """foe:: op calls in the returned graph(s) (FX path) or foe modules (module path)."""
    counts: dict[str, int] = {}
    whole = getattr(model, "graphs", None) or ([model] if hasattr(model, "graph") else [])
    graphs = whole[:1] or _block_graphs(model)
    for gm in graphs:
        for node in gm.graph.nodes:
            name = str(node.target)
            if "foe" in name:
                key = name.split(".")[1] if name.startswith("foe.") else name
                counts[key] = counts.get(key, 0) + 1
    if not graphs:
        for module in model.modules():
            if type(module).__name__.startswith("FoE"):
                counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def _block_graphs(model) -> list:
    """The first graph of each MoE block a module-level exact conversion rewrote (hf_blocks.py)."""
    from foe_compile import hf_blocks
    return [block.__dict__["_foe_block_graph"].graph.graph_module for _, block in hf_blocks.moe_blocks(model)
            if "_foe_block_graph" in block.__dict__]


def _path(converted) -> str:
    """fx (whole-model graph), blocks (the model with its MoE blocks rewritten) or module (FoE layer classes)."""
    from transformers import PreTrainedModel
    if not isinstance(converted, PreTrainedModel):
        return "fx"
    return "blocks" if _block_graphs(converted) else "module"


def _write(record: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(tmp, path)


def measure_family(model_type: str, record_path: str, attempt_timeout: int) -> None:
    """Fill and keep writing one family's record (so a crash still leaves what was measured)."""
    import torch
    import transformers

    import foe_compile
    from foe_compile import convert, hf_zoo

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    rec = {"model_type": model_type, "foe_compile": os.path.dirname(foe_compile.__file__), "attempts": {}}
    _write(rec, record_path)
    start = time.perf_counter()
    try:
        model = hf_zoo.tiny_model(model_type, seed=SEED)
        rec["model_class"] = type(model).__name__
        rec.update(hf_zoo.describe(model))
    except Exception as exc:  # noqa: BLE001
        rec["build"] = {"ok": False, "seconds": time.perf_counter() - start, **_error_fields(exc)}
        _write(rec, record_path)
        return
    rec["build"] = {"ok": True, "seconds": round(time.perf_counter() - start, 3)}
    gen = torch.Generator().manual_seed(SEED)
    ids = {name: torch.randint(0, model.config.vocab_size, shape, generator=gen) for name, shape in SHAPES.items()}
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            refs = {name: _run(model, x).detach().clone() for name, x in ids.items()}
        rec["source"] = {"ok": True, "seconds": round(time.perf_counter() - t0, 3)}
    except Exception as exc:  # noqa: BLE001
        rec["source"] = {"ok": False, **_error_fields(exc)}
        _write(rec, record_path)
        return
    _write(rec, record_path)

    for mode in MODES:
        att = {"status": "running"}
        rec["attempts"][mode] = att
        _write(rec, record_path)
        stage, t0 = "convert", time.perf_counter()
        try:
            _alarm(attempt_timeout)
            converted, report = convert(copy.deepcopy(model), mode=mode, calibration_inputs=ids["2x7"])
            att.update(path=_path(converted),
                       returned_type=type(converted).__name__, report_exact=bool(report.exact),
                       report_structurally_exact=getattr(report, "structurally_exact", None),
                       report_validation_error=getattr(report, "validation_error", None),
                       report_validation_tolerance=getattr(report, "validation_tolerance", None),
                       report_logits_max_rel_error=report.logits_max_rel_error,
                       report_moe_layers=sum(layer.kind == "moe" for layer in report.layers),
                       report_untouched_blocks=len(getattr(report, "untouched_blocks", ()) or ()),
                       foe_ops=_foe_op_counts(converted),
                       convert_seconds=round(time.perf_counter() - t0, 2))
            errors = {}
            with torch.no_grad():
                for name, x in ids.items():
                    stage = f"run_converted[{name}]"
                    out = _run(converted, x)
                    ref = refs[name]
                    errors[name] = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
            signal.alarm(0)
            att.update(status="ok", errors=errors, max_error=max(errors.values()))
        except BaseException as exc:  # noqa: BLE001 -- AttemptTimeout included
            signal.alarm(0)
            att.update(status="timeout" if isinstance(exc, AttemptTimeout) else "error", stage=stage,
                       **_error_fields(exc))
        att["seconds"] = round(time.perf_counter() - t0, 2)
        _write(rec, record_path)
    with torch.no_grad():  # convert() got copies: the source must be untouched
        rec["source_unchanged"] = bool(torch.equal(_run(model, ids["2x7"]), refs["2x7"]))
    _write(rec, record_path)


# ---------------------------------------------------------------------------------------------
# The sweep: subprocess per family, classification, tables

def run_family(model_type: str, attempt_timeout: int, snapshot: str | None) -> dict:
    fd, path = tempfile.mkstemp(prefix=f"foe_cov_{model_type}_", suffix=".json")
    os.close(fd)
    script = os.path.join(snapshot, Path(__file__).name) if snapshot else os.path.abspath(__file__)
    cmd = [sys.executable, script, "--worker", model_type, "--record", path,
           "--timeout", str(attempt_timeout)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if snapshot:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (snapshot, os.environ.get("PYTHONPATH")) if p)
    limit = attempt_timeout * len(MODES) + 120
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        output, _ = proc.communicate(timeout=limit)
        ended = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        ended = f"killed after the family limit of {limit} s"
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError):
        rec = {"model_type": model_type, "attempts": {}}
    finally:
        for p in (path, path + ".tmp"):
            if os.path.exists(p):
                os.remove(p)
    rec["wall_seconds"] = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:  # the worker died: whatever was running did not finish
        tail = [line for line in (output or "").splitlines() if line.strip()][-3:]
        rec["worker_died"] = f"{ended}; last output: {' | '.join(tail)[:300]}"
        for att in rec.get("attempts", {}).values():
            if att.get("status") == "running":
                att.update(status="crash", error_type="WorkerDied", error=rec["worker_died"][:200])
        if "build" not in rec:
            rec["build"] = {"ok": False, "error_type": "WorkerDied", "error": rec["worker_died"][:200]}
    rec["verdict"] = verdict(rec)
    return rec


def snapshot_package(dest_root: str) -> str:
    """Copy foe_compile/ (sources and the built _C) and this script (with its report module) under dest_root; returns the
    PYTHONPATH entry (the workers run the copied script)."""
    shutil.copytree(ROOT / "foe_compile", Path(dest_root) / "foe_compile",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for script in (Path(__file__), Path(__file__).with_name("family_coverage_report.py")):
        shutil.copy2(script, Path(dest_root) / script.name)
    return dest_root


def code_version() -> str:
    """Commit, plus a hash of the uncommitted foe_compile diff when there is one."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD").strip()
    diff = git("diff", "HEAD", "--", "foe_compile")
    untracked = git("ls-files", "--others", "--exclude-standard", "--", "foe_compile").split()
    for path in sorted(untracked):
        diff += path + (ROOT / path).read_text(errors="replace")
    if not diff:
        return commit
    return f"{commit} + uncommitted foe_compile changes (diff sha1 {hashlib.sha1(diff.encode()).hexdigest()[:10]})"




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help="comma-separated model types (default: every MoE family)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per convert attempt (default 240)")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "measured"))
    parser.add_argument("--render", action="store_true", help="only re-render the .md from the .json")
    parser.add_argument("--no-snapshot", action="store_true", help="workers import foe_compile from the tree")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        measure_family(args.worker, args.record, args.timeout)
        return 0

    out = Path(args.out_dir)
    if args.render:
        data = json.loads((out / "family_coverage.json").read_text())
        for r in data["families"]:
            for att in r.get("attempts", {}).values():
                att["category"] = category(att)
        (out / "family_coverage.json").write_text(json.dumps(data, indent=1, default=str))
        (out / "family_coverage.md").write_text(markdown(data["meta"], data["families"]))
        print(f"re-rendered {out / 'family_coverage.md'}")
        if not data["meta"].get("subset"):
            write_readme(data["meta"], data["families"])
        return 0

    import torch
    import transformers

    from foe_compile import hf_zoo

    version = code_version()
    snapshot_dir = None if args.no_snapshot else tempfile.mkdtemp(prefix="foe_cov_snapshot_")
    snapshot = snapshot_package(snapshot_dir) if snapshot_dir else None
    families = args.families.split(",") if args.families else hf_zoo.moe_families()
    print(f"{len(families)} families, {args.jobs} workers, {args.timeout} s per attempt", flush=True)
    start, rows = time.perf_counter(), {}
    with futures.ThreadPoolExecutor(args.jobs) as pool:
        jobs = {pool.submit(run_family, mt, args.timeout, snapshot): mt for mt in families}
        for done in futures.as_completed(jobs):
            rec = done.result()
            rows[rec["model_type"]] = rec
            a = rec.get("attempts", {})
            cells = "  ".join(f"{m}: {category(a[m]) if m in a else '-'}"
                              + (f" {fmt_err(a[m].get('max_error'))}" if a.get(m, {}).get("status") == "ok" else "")
                              for m in MODES)
            print(f"[{len(rows):>2}/{len(families)}] {rec['model_type']:<20} {rec['wall_seconds']:>6.1f} s  "
                  f"{rec['verdict']:<40} {cells}", flush=True)
    if snapshot_dir:
        shutil.rmtree(snapshot_dir, ignore_errors=True)
    ordered = [rows[mt] for mt in sorted(rows)]
    meta = {
        "transformers": transformers.__version__, "torch": torch.__version__, "commit": version,
        "command": " ".join(["python bench/family_coverage.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{os.cpu_count()} CPU cores", "jobs": args.jobs, "attempt_timeout_s": args.timeout,
        "families": len(ordered), "sweep_seconds": time.perf_counter() - start, "exact_tolerance": EXACT_TOL,
        "exact_count": sum(r["verdict"] == "exact" for r in ordered),
        "silent_wrong": sorted(f"{r['model_type']} ({m})" for r in ordered for m, a in r.get("attempts", {}).items()
                               if a.get("status") == "ok" and a["max_error"] > EXACT_TOL and claims_exact(a)),
        "composite": hf_zoo.composite_moe_types() if not args.families else {},
        "subset": bool(args.families),
    }
    for r in ordered:
        for att in r.get("attempts", {}).values():
            att["category"] = category(att)
    out.mkdir(parents=True, exist_ok=True)
    (out / "family_coverage.json").write_text(json.dumps({"meta": meta, "families": ordered}, indent=1, default=str))
    (out / "family_coverage.md").write_text(markdown(meta, ordered))
    if not args.families:
        write_readme(meta, ordered)
    print(f"exact: {meta['exact_count']}/{meta['families']}; sweep {meta['sweep_seconds']:.0f} s; wrote "
          f"{out / 'family_coverage.md'} and .json", flush=True)
    if meta["silent_wrong"]:
        print(f"!!! SILENT WRONG RESULTS (report says exact, measured error > {EXACT_TOL:g}): "
              f"{', '.join(meta['silent_wrong'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

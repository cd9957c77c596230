"""Hostile inputs (issue 11, placement): no crash, no silent wrong answer, no half-written output.

What is guaranteed, one test per case:
- a .pl that omits nodes, a truncated .pl, a .pl from another circuit: an error naming file and line;
- NaN/Inf sizes, coordinates or offsets, rows of height 0, duplicate node names, a truncated .gz,
  a directory where a file is expected: an error naming the file (and line where there is one);
- a macro larger than the canvas: `place` refuses before sampling, `evaluate` records a warning;
- nonsensical numbers (--guidance-steps -1, --legalizer-steps -5, --samples 0, --steps 0, ...):
  refused by the CLI and by the library's configs;
- an --out that is a file is refused before any work; a run that fails while writing leaves no
  .pl/.png/.json (nor temporary files); an illegal result is written with a warning in its JSON;
- truncated, random-bytes, text, missing-key and unknown-config-key checkpoints (and training
  checkpoints given to --resume): one line naming the file;
- every CLI mistake: exactly one `placement-compile <command>: error: ...` line, exit status 2, no traceback.
Corrupted files are made here, in tmp_path, from the real ibm01 or from tiny_circuit.
"""
from __future__ import annotations

import errno
import gzip
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from placement_compile import run_place
from placement_compile.bookshelf import BookshelfError, iccad04_aux, read_bookshelf, write_pl
from placement_compile.builtin_circuits import builtin_aux
from placement_compile.cli import DEFAULT_CHECKPOINT, main
from placement_compile.guidance import GuidanceConfig
from placement_compile.legalizer import LegalizerConfig
from placement_compile.model import CONFIGS
from placement_compile.sampler import PlaceConfig
from placement_compile.train import TrainConfig, train
from tests.placement.helpers import tiny_graph
from tests.placement.tiny_circuit import FILES, write_tiny

FAST = ["--steps", "2", "--samples", "1", "--guidance-steps", "1", "--legalizer-steps", "10", "--quiet"]
IBM01 = builtin_aux("ibm01")  # ships in the package: these tests never skip


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI on a mistake: status 2 and exactly one `error:` line, no traceback; returns that line."""
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"placement-compile {argv[0]}: error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def files_in(folder: Path) -> list[str]:
    """Every file under `folder` (hidden and temporary ones included); [] if it does not exist."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def ibm01_copy(tmp_path: Path, **texts: str) -> Path:
    """ibm01's files copied to tmp_path, with the named ones (e.g. pl=...) replaced by plain text."""
    for ext in ("aux", "nodes", "nets", "pl", "scl"):
        if ext in texts:
            (tmp_path / f"ibm01.{ext}").write_text(texts[ext])
        else:
            shutil.copy(IBM01.parent / f"ibm01.{ext}.gz", tmp_path)
    return tmp_path / "ibm01.aux"


def ibm01_text(ext: str) -> str:
    return gzip.decompress((IBM01.parent / f"ibm01.{ext}.gz").read_bytes()).decode()


# --- .pl files ---------------------------------------------------------------------------------


def test_pl_that_omits_nodes_is_an_error_not_pads_at_the_origin(tmp_path, capsys):
    aux = write_tiny(tmp_path)
    partial = tmp_path / "partial.pl"
    partial.write_text(FILES["tiny.pl"].replace("P 9 9 : N /FIXED\n", ""))
    with pytest.raises(BookshelfError) as info:
        read_bookshelf(aux, pl=partial)
    assert str(info.value).startswith(f"{partial}:5: 1 of the 4 nodes of tiny are not listed (P)")
    assert "a .pl must place every node" in str(info.value)
    line = cli_error(capsys, ["evaluate", str(aux), str(partial), "--json", str(tmp_path / "m.json")])
    assert "not listed (P)" in line
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("cut", ["mid_number", "mid_name", "line_boundary"])
def test_truncated_pl_is_an_error(tmp_path, capsys, cut):
    text = ibm01_text("pl")
    start = text.index("a5748    1145.0    1143.5")  # line 6001
    if cut == "mid_number":  # "a5748 1145.0 11" (for 1143.5) would otherwise parse
        end = start + len("a5748    1145.0    11")
        want = "ibm01.pl:6001: the file ends mid-line at 'a5748 1145.0 11' (truncated?)"
    elif cut == "mid_name":  # "a57" is a node too: not "listed twice", but cut
        end = start + len("a57")
        want = "ibm01.pl:6001: the file ends mid-line at 'a57' (truncated?)"
    else:
        end = text.index("\n", len(text) // 2) + 1
        want = "nodes of ibm01 are not listed"
    aux = ibm01_copy(tmp_path, pl=text[:end])
    line = cli_error(capsys, ["evaluate", str(aux), "--json", str(tmp_path / "m.json")])
    assert want in line and str(tmp_path / "ibm01.pl") in line
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("case", ["more_nodes", "fewer_nodes", "same_names_moved_pads"])
def test_pl_from_another_circuit_is_refused_by_evaluate(tmp_path, capsys, case):
    data = iccad04_aux("ibm02").parent.parent  # the shared ICCAD04 folder (ibm02 does not ship)
    if case != "same_names_moved_pads" and not (data / "ibm02" / "ibm02.aux.gz").exists():
        pytest.skip(f"{data}/ibm02 not found: set FOE_DATA_DIR to the folder holding iccad04/")
    if case == "more_nodes":  # ibm02 (19,601 nodes) scored as ibm01 (12,752)
        argv, want = [str(IBM01), str(data / "ibm02" / "ibm02.pl.gz")], "ibm02.pl.gz:253: unknown node 'p247' (and 6848 more"
    elif case == "fewer_nodes":  # ibm01 scored as ibm02
        argv, want = [str(data / "ibm02" / "ibm02.aux"), str(IBM01.parent / "ibm01.pl.gz")], "6849 of the 19601 nodes"
    else:  # every name matches, but the pads sit elsewhere
        other = tmp_path / "other.pl"
        other.write_text(FILES["tiny.pl"].replace("P 9 9", "P 0 9"))
        argv, want = [str(write_tiny(tmp_path)), str(other)], "other.pl:6: fixed node P is at (0, 9) but tiny.pl of tiny fixes it at (9, 9)"
    line = cli_error(capsys, ["evaluate", *argv])
    assert want in line and "another circuit" in line


# --- numbers and sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize("file,old,new,line", [
    ("tiny.nodes", "B 2 3", "B nan 3", 6),
    ("tiny.nodes", "B 2 3", "B 2 inf", 6),
    ("tiny.pl", "B 5 5", "B 5 NaN", 4),
    ("tiny.pl", "B 5 5", "B -inf 5", 4),
    ("tiny.nets", "A O : 1 0", "A O : 1 inf", 6),
    ("tiny.scl", "Coordinate : 4\n", "Coordinate : nan\n", 40),
])
def test_nan_or_inf_sizes_and_coordinates_are_errors(tmp_path, file, old, new, line):
    aux = write_tiny(tmp_path, **{file.replace(".", "_"): FILES[file].replace(old, new, 1)})
    with pytest.raises(BookshelfError) as info:
        read_bookshelf(aux)
    assert str(info.value).startswith(f"{tmp_path / file}:{line}: non-finite number in ")


def test_macro_larger_than_the_canvas_is_refused_by_place_and_a_warning_in_evaluate(tmp_path, capsys):
    aux = write_tiny(tmp_path, tiny_nodes=FILES["tiny.nodes"].replace("B 2 3", "B 2 30"))
    out = tmp_path / "out"
    line = cli_error(capsys, ["place", str(aux), "--out", str(out), *FAST])
    assert "macro B is 2 x 30 but the canvas is 10 x 10: no legal placement exists" in line
    assert files_in(out) == []
    assert main(["evaluate", str(aux), "--json", str(tmp_path / "m.json")]) == 0
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["warnings"] == ["macro B is 2 x 30 but the canvas is 10 x 10: macro legality cannot reach 1.0"]
    assert "warning: macro B is 2 x 30" in capsys.readouterr().err


def test_rows_of_height_zero_are_an_error(tmp_path):
    # Row 4 (CoreRow at line 39) gets Height 0: with a zero row height every cell would be a "macro".
    aux = write_tiny(tmp_path, tiny_scl=FILES["tiny.scl"].replace("Coordinate : 4\n Height : 1", "Coordinate : 4\n Height : 0"))
    with pytest.raises(BookshelfError) as info:
        read_bookshelf(aux)
    assert str(info.value).startswith(f"{tmp_path / 'tiny.scl'}:39: row has Height 0; rows need a positive height")


@pytest.mark.parametrize("argv,flag", [
    (["place", "A", "--guidance-steps", "-1"], "argument --guidance-steps: must be >= 0, got -1"),
    (["place", "A", "--legalizer-steps", "-5"], "argument --legalizer-steps: must be >= 0, got -5"),
    (["place", "A", "--samples", "0"], "argument --samples: must be >= 1, got 0"),
    (["place", "A", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["place", "A", "--steps", "1e3"], "argument --steps: expected an integer >= 1, got '1e3'"),
    (["place", "A", "--threads", "-2"], "argument --threads: must be >= 0, got -2"),
    (["train", "r", "--data", "d", "--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["train", "r", "--data", "d", "--val-every", "0"], "argument --val-every: must be >= 1, got 0"),
    (["generate", "d", "--circuits", "0"], "argument --circuits: must be >= 1, got 0"),
])
def test_nonsensical_numbers_are_refused_by_the_cli(tmp_path, capsys, argv, flag):
    argv = [str(tmp_path / a) if a in ("A", "r", "d") else a for a in argv]
    assert flag in cli_error(capsys, argv)
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("make,words", [
    (lambda: PlaceConfig(samples=0), "samples must be an integer >= 1, got 0"),
    (lambda: PlaceConfig(steps=0), "diffusion steps must be an integer >= 1, got 0"),
    (lambda: GuidanceConfig(steps=-1), "guidance steps must be an integer >= 0"),
    (lambda: LegalizerConfig(steps=-5), "legalizer steps must be an integer >= 0 (0 skips legalization), got -5"),
    (lambda: TrainConfig(val_every=0), "val_every = 0"),
    (lambda: TrainConfig(lr=float("nan")), "lr = nan"),
])
def test_nonsensical_numbers_are_refused_by_the_library_configs(make, words):
    with pytest.raises(ValueError) as info:
        make()
    assert words in str(info.value)


# --- outputs -------------------------------------------------------------------------------------


def test_out_that_is_a_file_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the circuit was read before --out was checked")

    monkeypatch.setattr(run_place, "read_bookshelf", must_not_run)
    aux = write_tiny(tmp_path / "tiny")
    existing = tmp_path / "results"
    existing.write_text("keep me")
    line = cli_error(capsys, ["place", str(aux), "--out", str(existing), *FAST])
    assert f"--out {existing} is an existing file; give a directory" in line
    line = cli_error(capsys, ["place", str(aux), "--out", str(existing / "ibm01"), *FAST])
    assert f"{existing} is a file, not a directory" in line
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("a bug")])
def test_a_run_that_fails_while_writing_leaves_no_output(tmp_path, capsys, monkeypatch, failure):
    def plot_then_fail(circuit, lower_left, path, title):  # half a PNG, then the failure
        Path(path).write_bytes(b"\x89PNG\r\n")
        raise failure

    monkeypatch.setattr(run_place, "plot_placement", plot_then_fail)
    aux, out = write_tiny(tmp_path / "tiny"), tmp_path / "out"
    argv = ["place", str(aux), "--out", str(out), *FAST]
    if isinstance(failure, OSError):  # a user-side problem: one error line
        assert "No space left on device" in cli_error(capsys, argv)
    else:  # an internal error still raises, and still leaves nothing behind
        with pytest.raises(RuntimeError, match="a bug"):
            main(argv)
    assert files_in(out) == []  # no tiny.pl (it was written before the PNG), .png, .json or *.partial


def test_write_pl_refuses_non_finite_positions_and_writes_nothing(tmp_path):
    circuit = read_bookshelf(write_tiny(tmp_path))
    ll = circuit.positions.copy()
    ll[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"position of node B is \[nan, 5.0\]; a .pl needs finite positions"):
        write_pl(circuit, tmp_path / "out.pl", ll)
    assert not (tmp_path / "out.pl").exists()


def test_an_illegal_result_is_written_with_a_warning_in_its_json(tmp_path, capsys):
    aux, out = write_tiny(tmp_path / "tiny"), tmp_path / "out"
    assert main(["place", str(aux), "--out", str(out), *FAST[:-3], "--legalizer-steps", "0", "--quiet"]) == 0
    assert files_in(out) == ["tiny.json", "tiny.pl", "tiny.png"]
    report = json.loads((out / "tiny.json").read_text())
    legality = report["placed"]["macro_legality"]
    assert legality < 1  # 2 diffusion steps, no legalizer: overlaps remain
    assert report["warnings"] == [
        f"macro legality {legality:.6f} < 1: the best of 1 samples still has overlapping macros or macros outside "
        f"the canvas after 0 legalizer steps; raise --legalizer-steps or --samples"]
    assert "placement-compile place: warning: macro legality" in capsys.readouterr().err


# --- checkpoints ---------------------------------------------------------------------------------


def _checkpoint(path: Path, kind: str) -> None:
    good = torch.load(DEFAULT_CHECKPOINT, weights_only=True)
    if kind == "truncated":
        path.write_bytes(DEFAULT_CHECKPOINT.read_bytes()[: DEFAULT_CHECKPOINT.stat().st_size // 2])
    elif kind == "random_bytes":
        path.write_bytes(b"\x00" + np.random.default_rng(0).bytes(4095))
    elif kind == "text":
        path.write_text("model weights go here\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "missing_key":
        torch.save({"config": good["config"]}, path)
    elif kind == "unknown_config_key":
        torch.save({**good, "config": {**good["config"], "dropout": 1}}, path)
    elif kind == "wrong_shapes":
        torch.save({**good, "config": asdict(CONFIGS["medium"])}, path)
    elif kind == "directory":
        path.mkdir()


@pytest.mark.parametrize("kind,words", [
    ("truncated", "cannot read this checkpoint: the file is truncated or damaged"),
    ("random_bytes", "cannot read this checkpoint: not a torch.save file (it starts with b'\\x00"),
    ("text", "cannot read this checkpoint: not a torch.save file (it starts with b'model we')"),
    ("empty", "cannot read this checkpoint: the file is empty"),
    ("missing_key", "is not an AttGNN checkpoint (it holds keys ['config']; expected keys 'config' and 'state_dict')"),
    ("unknown_config_key", "unknown config key(s) 'dropout' (known: hidden, blocks,"),
    ("wrong_shapes", "weights do not fit its config: wrong shape or type for"),
    ("directory", "is a directory; expected a file"),
])
def test_broken_checkpoints_are_one_clear_line(tmp_path, capsys, kind, words):
    ckpt, out = tmp_path / "model.pt", tmp_path / "out"
    _checkpoint(ckpt, kind)
    line = cli_error(capsys, ["place", str(write_tiny(tmp_path / "tiny")), "--checkpoint", str(ckpt),
                              "--out", str(out), *FAST])
    assert str(ckpt) in line and words in line
    assert files_in(out) == []


# --- malformed files -----------------------------------------------------------------------------


@pytest.mark.parametrize("file,text,line,words", [
    ("tiny.nodes", FILES["tiny.nodes"].replace("c 1 1\n", "c 1 1\nA 3 3\n"), 8, "node A is defined twice (first at line 5)"),
    ("tiny.pl", FILES["tiny.pl"].replace("c 3 0 : N\n", "c 3 0 : N\nA 1 1 : N\n"), 6, "node A is listed twice (first at line 3)"),
])
def test_duplicate_node_names_are_an_error(tmp_path, file, text, line, words):
    aux = write_tiny(tmp_path, **{file.replace(".", "_"): text})
    with pytest.raises(BookshelfError) as info:
        read_bookshelf(aux)
    assert str(info.value) == f"{tmp_path / file}:{line}: {words}" + ("; node names must be unique" if file == "tiny.nodes" else "")


def test_truncated_gz_is_an_error(tmp_path, capsys):
    aux = ibm01_copy(tmp_path)
    nets = tmp_path / "ibm01.nets.gz"
    nets.write_bytes(nets.read_bytes()[:100_000])
    line = cli_error(capsys, ["evaluate", str(aux)])
    assert f"{nets}:0: corrupt or truncated gzip data" in line and "re-copy or re-compress the file" in line


@pytest.mark.parametrize("where", ["aux", "nodes_named_by_aux", "pl", "evaluate_json"])
def test_a_directory_where_a_file_is_expected_is_an_error(tmp_path, capsys, where):
    aux = write_tiny(tmp_path / "tiny")
    argv = ["evaluate", str(aux)]
    if where == "aux":
        argv[1] = str(tmp_path / "tiny")
        want = f"{tmp_path / 'tiny'}:0: is a directory; expected a Bookshelf file"
    elif where == "nodes_named_by_aux":
        (tmp_path / "tiny" / "tiny.nodes").unlink()
        (tmp_path / "tiny" / "tiny.nodes").mkdir()
        want = f"{tmp_path / 'tiny' / 'tiny.nodes'}:0: is a directory"
    elif where == "pl":
        argv.append(str(tmp_path))
        want = f"{tmp_path}:0: is a directory"
    else:
        argv += ["--json", str(tmp_path)]
        want = f"{tmp_path} is a directory; expected a file name to write"
    assert want in cli_error(capsys, argv)


@pytest.mark.parametrize("kind,words", [
    ("truncated", "cannot read this training checkpoint: the file is truncated or damaged"),
    ("missing_key", "is not a training checkpoint (it lacks generator, history, model, optimizer, step)"),
])
def test_resuming_from_a_broken_training_checkpoint_is_one_clear_line(tmp_path, kind, words):
    ckpt = tmp_path / "last.pt"
    if kind == "truncated":
        train([tiny_graph()], [], tmp_path, TrainConfig(steps=1, warmup=1), progress=False)
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    else:
        torch.save({"config": {}}, ckpt)
    with pytest.raises(ValueError) as info:
        train([tiny_graph()], [], tmp_path, TrainConfig(steps=2, warmup=1), resume=True, progress=False)
    assert str(info.value).startswith(str(ckpt)) and words in str(info.value) and "\n" not in str(info.value)

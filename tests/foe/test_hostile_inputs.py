"""Hostile inputs: no crash, no silent wrong answer, no half-written output.

What is guaranteed, one test each:
- a saved `foe` section with a missing, unknown or edited key is refused on load, naming the file;
- a checkpoint missing a weight is refused on load (not filled with random values);
- a save writes nothing when the weights are on the meta device or the path is a file, and an
  interrupted save leaves neither a directory that looks complete nor a damaged old one;
- `foe-compile convert` refuses an --out that is a file and an already converted directory,
  before converting;
- the compile backend checks its options (ValueError saying what is valid) before tracing;
- every CLI user mistake is one `error: ...` line, no traceback, exit code 2 (under torchrun too).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from foe_testing import tokens
from safetensors.torch import load_file, save_file
from torch._dynamo.exc import BackendCompilerFailed

from foe_compile import builtin_model, convert, from_pretrained
from foe_compile.backend import validate_options
from foe_compile.cli import main


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A converted olmoe-tiny (exact mode, H=4) saved once; tests copy it before changing it."""
    path = tmp_path_factory.mktemp("saved") / "olmoe-exact"
    model, _ = convert(builtin_model("olmoe-tiny"), mode="exact")
    model.save_pretrained(path)
    return path


@pytest.fixture
def saved(saved_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(saved_dir, path)
    return path


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)  # ranks other than 0 wait before printing an error


def edit_foe_section(path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config["foe"])
    (path / "config.json").write_text(json.dumps(config))


def cli_error(capsys, argv: list[str]) -> str:
    """Run foe-compile in-process and check it reports a user mistake; returns the error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


# --- from_pretrained: the saved FoE settings are complete and unedited, or nothing loads -------

@pytest.mark.parametrize("key", ["mode", "num_groups"])
def test_foe_section_missing_a_key_is_refused(saved, key):
    """Before: a section without `mode` loaded the approximate FoE form of an exact save."""
    edit_foe_section(saved, lambda foe: foe.pop(key))
    file = re.escape(str(saved / "config.json"))
    with pytest.raises(ValueError, match=rf"^{file}: the 'foe' section lacks the key\(s\) \['{key}'\]"):
        from_pretrained(saved)


def test_foe_section_with_an_unknown_key_is_refused(saved):
    edit_foe_section(saved, lambda foe: foe.update(groups=2))
    with pytest.raises(ValueError, match=r"config\.json: the 'foe' section has unknown key\(s\) \['groups'\]"):
        from_pretrained(saved)


def test_edited_foe_section_is_detected(saved):
    def to_foe(foe):
        assert foe["schema_version"] == 1 and foe["checksum"].startswith("sha256:")
        foe["mode"] = "foe"  # a valid setting, but not the one saved

    edit_foe_section(saved, to_foe)
    with pytest.raises(ValueError, match=r"config\.json: the 'foe' section was edited after saving"):
        from_pretrained(saved)


def test_checkpoint_missing_a_weight_is_refused(saved):
    weights = load_file(saved / "model.safetensors")
    del weights["model.layers.1.mlp.gate.weight"]
    save_file(weights, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weight\(s\).*model\.layers\.1\.mlp\.gate\.weight"):
        from_pretrained(saved)


# --- save_pretrained: all or nothing ----------------------------------------------------------

def test_meta_model_save_writes_nothing(tmp_path):
    model, _ = convert(builtin_model("olmoe-tiny", device="meta"))
    with pytest.raises(ValueError, match="on the meta device.*nothing was written"):
        model.save_pretrained(tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_save_to_an_existing_file_is_refused(tmp_path):
    model, _ = convert(builtin_model("olmoe-tiny"))
    target = tmp_path / "taken"
    target.write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        model.save_pretrained(target)
    assert target.read_text() == "keep me" and os.listdir(tmp_path) == ["taken"]


def fail_writing_weights(monkeypatch):
    """transformers writes config.json first, then the weights: fail in between."""
    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", boom)


def test_interrupted_save_leaves_no_directory(tmp_path, monkeypatch):
    model, _ = convert(builtin_model("olmoe-tiny"))
    fail_writing_weights(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "out")
    assert os.listdir(tmp_path) == []  # no config.json without weights, no staging directory


def test_interrupted_save_over_a_saved_model_keeps_it(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model, _ = convert(builtin_model("olmoe-tiny", seed=1))
    fail_writing_weights(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(os.listdir(saved.parent)) == ["model"]


@torch.no_grad()
def test_save_over_a_saved_model_replaces_it_and_keeps_other_files(saved):
    (saved / "tokenizer.json").write_text("{}")
    (saved / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    model, _ = convert(builtin_model("qwen3-moe-tiny"), num_groups=2)
    model.save_pretrained(saved)
    assert sorted(os.listdir(saved)) == ["config.json", "generation_config.json", "model.safetensors",
                                         "tokenizer.json"]
    ids = tokens(1, 5)
    assert torch.equal(from_pretrained(saved)(ids).logits, model(ids).logits)


# --- foe-compile convert: refuse before converting ------------------------------------------

def test_cli_out_that_is_a_file_is_refused_before_converting(tmp_path, capsys):
    """Before: printed "saved" and saved nothing (transformers only logs a path that is a file)."""
    target = tmp_path / "out"
    target.write_text("keep me")
    line = cli_error(capsys, ["convert", "olmoe-tiny", "--calibration-tokens", "0", "--out", str(target)])
    assert "exists and is not a directory" in line
    assert target.read_text() == "keep me"
    assert capsys.readouterr().out == ""  # no report: nothing was converted


def test_cli_refuses_an_already_converted_directory(saved, capsys):
    """Before: converted the source weights again, ignoring the saved FoE settings."""
    line = cli_error(capsys, ["convert", str(saved), "--calibration-tokens", "0"])
    assert "already a converted model (mode='exact', num_groups=4)" in line
    assert f"foe_compile.from_pretrained('{saved}')" in line


def test_cli_out_with_meta_weights_is_refused_before_converting(tmp_path, capsys):
    line = cli_error(capsys, ["convert", "qwen3-30b-a3b", "--out", str(tmp_path / "out")])
    assert "--out needs real weights" in line and "meta device" in line
    assert os.listdir(tmp_path) == [] and capsys.readouterr().out == ""


# --- torch.compile(backend="foe"): options checked before tracing --------------------------

@pytest.mark.parametrize("options, message", [
    ({"groups": 2}, r"unknown foe backend option\(s\) \['groups'\]; valid: \['num_groups'"),
    ({"num_groups": 0}, "num_groups must be an integer >= 1"),
    ({"num_groups": 2.0}, "num_groups must be an integer >= 1"),
    ({"num_groups": True}, "num_groups must be an integer >= 1"),
    ({"mode": "fast"}, "mode must be 'exact' or 'foe', got 'fast'"),
    ({"compiler": "tensorrt"}, "compiler must be 'inductor' or 'eager'"),
    ({"attn_stream_scale": 2.0}, r"attn_stream_scale only applies to mode='foe'"),
    ({"mode": "foe", "attn_stream_scale": 0.5}, r"attn_stream_scale must be a number in \[1, H\], got 0.5"),
    ({"mode": "foe", "num_groups": 2, "attn_stream_scale": 3}, r"in \[1, H=2\], got 3"),
    ({"mode": "foe", "attn_stream_scale": float("nan")}, r"in \[1, H\], got nan"),
    ("num_groups=2", "options must be a dict"),
])
def test_bad_backend_options_say_what_is_valid(options, message):
    with pytest.raises(ValueError, match=message):
        validate_options(options)


def test_backend_checks_options_before_tracing():
    """Before: num_groups=0 raised ZeroDivisionError from inside a pass (or, on a graph with no
    MoE block, compiled silently)."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x * 2, backend="foe", options={"num_groups": 0})
    with pytest.raises(BackendCompilerFailed) as info:
        compiled(torch.ones(3))
    torch._dynamo.reset()
    assert isinstance(info.value.inner_exception, ValueError)
    assert re.search(r"num_groups must be an integer >= 1 .*got 0$", str(info.value.inner_exception))
    assert validate_options({"mode": "foe", "num_groups": 2, "attn_stream_scale": 2}) == dict(
        num_groups=2, compiler="inductor", mode="foe", attn_stream_scale=2.0)


# --- every CLI user mistake: one `error:` line, exit code 2 ---------------------------------

@pytest.mark.parametrize("argv, message", [
    (["convert", "olmoe-tiny", "--groups", "0"], "argument --groups: must be an integer >= 1, got 0"),
    (["convert", "olmoe-tiny", "--gpus", "x"], "argument --gpus: expected an integer, got 'x'"),
    (["convert", "olmoe-tiny", "--calibration-tokens", "-1"], "must be an integer >= 0, got -1"),
    (["convert", "olmoe-tiny", "--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
    (["convert", "mixtral-tiny", "--groups", "4", "--calibration-tokens", "0"], r"Valid num_groups: [1, 2]"),
    (["convert", "olmoe-9000-tiny"], "is neither a local model directory nor a built-in model"),
    (["distributed-bench", "--tokens", "0"], "argument --tokens: must be an integer >= 1, got 0"),
    (["distributed-bench", "--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
    (["distributed-bench", "--groups", "0"], "argument --groups: must be an integer >= 1, got 0"),
    (["distributed-bench", "--timeout", "-5"], "argument --timeout: must be a finite number of seconds > 0"),
    (["distributed-bench", "--model", "mixtral-8x7b"], "argument --model: invalid choice"),
    (["distributed-bench"], "RANK/WORLD_SIZE are not set: launch with torchrun"),
    (["convert"], "the following arguments are required: source"),
])
def test_cli_user_mistakes_are_one_error_line(capsys, argv, message):
    assert message in cli_error(capsys, argv)


@pytest.mark.parametrize("damage, message", [
    ("remove config.json", "has no config.json"),
    ("config.json is not JSON", r"config.json is not valid JSON"),
    ("config.json is a list", "config.json must hold a JSON object, got list"),
    ("no model_type", "cannot load a model from .*model_type"),
    ("truncated weights", "cannot load a model from .*deserializing header"),
    ("no weights", "cannot load a model from .*no file named model.safetensors"),
])
def test_cli_broken_model_directory_is_one_error_line(tmp_path, capsys, damage, message):
    path = tmp_path / "src"
    builtin_model("olmoe-tiny").save_pretrained(path)
    config, weights = path / "config.json", path / "model.safetensors"
    if damage == "remove config.json":
        config.unlink()
    elif damage == "config.json is not JSON":
        config.write_text("{'model_type': 'olmoe',")
    elif damage == "config.json is a list":
        config.write_text("[]")
    elif damage == "no model_type":
        config.write_text("{}")
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    capsys.readouterr()
    line = cli_error(capsys, ["convert", str(path), "--calibration-tokens", "0"])
    assert re.search(message, line), line


def test_distributed_bench_under_torchrun_is_one_error_line():
    """Rank 0 prints the line and exits with code 2; torchrun stops the other ranks, which wait
    for that before saying the same. (torchrun then reports the failed rank and exits with 1:
    its own behaviour, not ours.)"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "foe_compile.cli", "distributed-bench", "--tokens", "0"],
                         capture_output=True, text=True, timeout=120, env=env)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: argument --tokens: must be an integer >= 1, got 0 "
                      "(see `foe-compile distributed-bench --help`)"], run.stderr
    root_cause = run.stderr[run.stderr.index("Root Cause"):]
    assert run.returncode != 0 and "rank      : 0" in root_cause and "exitcode  : 2" in root_cause, run.stderr
    assert "foe_compile" not in run.stderr.replace("foe_compile.cli FAILED", ""), run.stderr

"""The foe-compile command line: convert (built-in name or local directory) and demo."""
import json

import pytest
import torch
from foe_testing import tokens

from foe_compile import builtin_model, from_pretrained
from foe_compile.cli import main
from foe_compile.models import ExactDecoderLayer


def test_convert_builtin_saves_and_reports(tmp_path, capsys):
    out, report = tmp_path / "model", tmp_path / "report.json"
    assert main(["convert", "qwen3-moe-tiny", "--mode", "exact", "--calibration-tokens", "16",
                 "--out", str(out), "--report-json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["mode"] == "exact" and data["calibration_tokens"] == 16 and data["logits_max_rel_error"] <= 1e-5
    assert "expert-parallel all-to-all" in capsys.readouterr().out
    assert isinstance(from_pretrained(out).model.layers[0], ExactDecoderLayer)


@torch.no_grad()
def test_convert_local_directory(tmp_path):
    source = builtin_model("olmoe-tiny")
    source.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), "--groups", "2", "--out", str(tmp_path / "foe")]) == 0
    model = from_pretrained(tmp_path / "foe")
    assert model.foe_config.num_groups == 2
    model(tokens(1, 5))


def user_error(capsys, argv: list[str]) -> str:
    """main(argv) must report a user mistake: exit code 2 and one `error: ...` line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ")
    return line


def test_convert_errors_are_clear(tmp_path, capsys):
    assert "neither a local model directory nor a built-in model" in user_error(
        capsys, ["convert", str(tmp_path / "missing")])
    assert "Valid num_groups: [1, 2]" in user_error(
        capsys, ["convert", "mixtral-tiny", "--groups", "4", "--calibration-tokens", "0"])


def test_demo_verifies_every_family(capsys):
    assert main(["demo", "--calibration-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("exact-mode check") == 4 and "FAILED" not in out
    assert "exact mode verified for every family" in out


@torch.no_grad()
def test_convert_and_export_to_onnx(tmp_path, capsys):
    import onnxruntime as ort

    path = tmp_path / "mixtral.onnx"
    assert main(["convert", "mixtral-tiny", "--calibration-tokens", "0", "--onnx", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: tokens(1, 3).numpy()})
    assert out.shape == (1, 3, 128)
    assert "--onnx needs real weights" in user_error(
        capsys, ["convert", "mixtral-8x7b", "--groups", "2", "--calibration-tokens", "0", "--onnx", str(path)])

"""save_pretrained / from_pretrained round trips keep the FoE structure (safetensors)."""
import os

import pytest
import torch
from foe_testing import fresh_copy, tokens
from transformers import AutoModelForCausalLM

from foe_compile import builtin_model, convert, from_pretrained
from foe_compile.models import FoEDecoderLayer


@torch.no_grad()
@pytest.mark.parametrize("assignment", ["contiguous", "calibrated"])
def test_round_trip_restores_foe_model(source, tmp_path, assignment):
    ids = tokens(2, 9)
    model, _ = convert(fresh_copy(source), expert_assignment=assignment, calibration_inputs=ids)
    model.save_pretrained(tmp_path)
    assert "model.safetensors" in os.listdir(tmp_path)
    for loaded in (from_pretrained(tmp_path), type(model).from_pretrained(tmp_path)):
        assert isinstance(loaded.model.layers[0], FoEDecoderLayer)
        assert loaded.foe_config == model.foe_config
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@torch.no_grad()
def test_checkpoint_is_the_source_layout(source, tmp_path):
    """Plain transformers loads the saved directory as the unconverted source model."""
    ids = tokens(1, 7)
    expected = source(ids).logits
    model, _ = convert(fresh_copy(source), mode="exact")
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(plain).__name__ == type(source).__name__
    assert torch.equal(plain(ids).logits, expected)


def test_loading_an_unconverted_directory_fails_clearly(source, tmp_path):
    source.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no 'foe' section"):
        from_pretrained(tmp_path)


def test_save_publishes_one_directory_with_the_usual_mode(tmp_path):
    """Saving writes beside the target and renames: no staging directory is left, and the saved
    directory gets the mode any new directory gets (not a private temporary directory's 0o700)."""
    model, _ = convert(builtin_model("olmoe-tiny"), mode="exact")
    model.save_pretrained(tmp_path / "saved")
    (tmp_path / "plain").mkdir()
    assert sorted(os.listdir(tmp_path)) == ["plain", "saved"]
    assert (tmp_path / "saved").stat().st_mode == (tmp_path / "plain").stat().st_mode

"""save_pretrained / from_pretrained round trips keep the FoE structure (safetensors)."""
import os

import pytest
import torch
from foe_testing import fresh_copy, tokens
from transformers import AutoModelForCausalLM

from foe_compile import convert, from_pretrained
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

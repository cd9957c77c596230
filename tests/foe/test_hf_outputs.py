"""Hugging Face's optional outputs on converted models (hidden states, router logits, aux loss):
equal to the source's in exact mode, present and consistent in FoE mode."""
import pytest
import torch
from foe_testing import EXACT_MAX_REL, fresh_copy, max_rel, tokens

from foe_compile import convert

IDS = tokens(2, 7)
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])  # left padding


def outputs(model):
    return model(IDS, attention_mask=MASK, labels=IDS, output_hidden_states=True, output_router_logits=True)


@torch.no_grad()
def test_exact_mode_outputs_equal_the_source(source):
    expected = outputs(source)
    model, _ = convert(fresh_copy(source), mode="exact")
    got = outputs(model)
    assert len(got.hidden_states) == len(expected.hidden_states) == source.config.num_hidden_layers + 1
    for a, b in zip(got.hidden_states, expected.hidden_states):
        assert max_rel(a, b) <= EXACT_MAX_REL
    assert len(got.router_logits) == len(expected.router_logits)
    for a, b in zip(got.router_logits, expected.router_logits):
        assert a.shape == b.shape and max_rel(a, b) <= EXACT_MAX_REL
    assert max_rel(got.aux_loss, expected.aux_loss) <= EXACT_MAX_REL
    assert max_rel(got.loss, expected.loss) <= EXACT_MAX_REL
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.model.layers)


@torch.no_grad()
def test_foe_mode_outputs(source):
    model, _ = convert(fresh_copy(source), mode="foe")
    got = outputs(model)
    plain = model(IDS, attention_mask=MASK, labels=IDS)
    assert max_rel(got.logits, plain.logits) == 0.0  # collecting changes nothing
    assert torch.equal(got.hidden_states[0], model.model.embed_tokens(IDS))
    assert [h.shape for h in got.hidden_states] == [IDS.shape + (source.config.hidden_size,)] * len(got.hidden_states)
    assert torch.isfinite(got.aux_loss)
    assert float(got.loss) == pytest.approx(float(plain.loss) + source.config.router_aux_loss_coef * float(got.aux_loss),
                                            rel=1e-6)


@torch.no_grad()
def test_tuple_outputs_like_the_source(source):
    expected = source(IDS, labels=IDS, output_hidden_states=True, output_router_logits=True, return_dict=False,
                      use_cache=False)
    model, _ = convert(fresh_copy(source), mode="exact")
    got = model(IDS, labels=IDS, output_hidden_states=True, output_router_logits=True, return_dict=False,
                use_cache=False)
    assert isinstance(got, tuple) and len(got) == len(expected)
    for a, b in zip(got, expected):
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert max_rel(x, y) <= EXACT_MAX_REL


def test_output_attentions_is_refused(source):
    model, _ = convert(fresh_copy(source), mode="exact")
    with pytest.raises(ValueError, match="does not return attention weights"):
        model(IDS, output_attentions=True)

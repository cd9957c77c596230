"""Hugging Face's optional outputs on converted models: hidden states, router logits, aux loss.

transformers collects them with hooks on its own module classes (the decoder layer, the
top-k router), which a converted model no longer holds, so the converted class's forward
collects them itself, with hooks that exist only during a call that asks for them:
  hidden_states  the first layer's input, then every layer's output (an FoE layer's state is
                 reduced to the model-level stream, r_full + sum_h m_h), the last one after the
                 final norm, as transformers records them
  router_logits  per MoE layer, the router's logits over all E experts in source expert order,
                 computed from the layer's Norm2 output (exact mode: the source's logits)
  aux_loss       the family's own load_balancing_loss_func on those logits (its global top-k),
                 added to the loss with router_aux_loss_coef when labels are given
output_attentions is refused: attention weights are never materialised.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch.nn.functional as F

from .models import FoEMoE
from .models.group_streams import stream_mean


def converted_forward(source_cls: type) -> Callable:
    """The forward of a converted `source_cls` model: the source's, with the collection above
    (and the source's signature, which torch.export and ONNX input names read)."""

    @functools.wraps(source_cls.forward)
    def forward(self, *args, **kwargs):
        return _forward(self, source_cls, *args, **kwargs)

    return forward


def _forward(self, source_cls: type, *args, output_hidden_states: bool | None = None,
             output_router_logits: bool | None = None, output_attentions: bool | None = None, **kwargs):
    config = self.config
    want_hidden = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
    want_router = output_router_logits if output_router_logits is not None else config.output_router_logits
    if output_attentions if output_attentions is not None else config.output_attentions:
        raise ValueError("a converted model does not return attention weights (its attention never materialises "
                         "them); run the source model with attn_implementation='eager' for output_attentions")
    if not (want_hidden or want_router):
        return source_cls.forward(self, *args, output_router_logits=False, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    as_tuple = not (return_dict if return_dict is not None else config.use_return_dict)
    hidden, logits, handles = [], [], []
    layers = self.model.layers
    if want_hidden:
        handles.append(layers[0].register_forward_pre_hook(lambda _m, a, kw: hidden.append(a[0] if a else
                                                                                             kw["hidden_states"]),
                                                           with_kwargs=True))
        handles += [layer.register_forward_hook(lambda _m, _a, out: hidden.append(stream_mean(out))) for layer in layers]
        handles.append(self.model.norm.register_forward_hook(lambda _m, _a, out: hidden.append(out)))
    if want_router:
        handles += [layer.mlp.register_forward_hook(lambda m, a, _out: logits.append(F.linear(a[0], m.router.weight)))
                    for layer in layers if isinstance(layer.mlp, FoEMoE)]
    try:
        out = source_cls.forward(self, *args, output_router_logits=False, return_dict=True, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    extra = {}
    if want_hidden:
        extra["hidden_states"] = (*hidden[:-2], hidden[-1])  # the last layer's entry is after the final norm
    if want_router:
        extra["router_logits"] = tuple(logits)
        loss_fn = sys.modules[source_cls.__module__].load_balancing_loss_func
        extra["aux_loss"] = loss_fn(extra["router_logits"], self.num_experts, self.num_experts_per_tok,
                                    kwargs.get("attention_mask"))
        if out.loss is not None:
            extra["loss"] = out.loss + self.router_aux_loss_coef * extra["aux_loss"].to(out.loss.device)
    out = type(out)(**{**out, **extra})  # rebuilt, so that fields (and to_tuple) keep the declared order
    return out.to_tuple() if as_tuple else out

"""FoE mode follows DESIGN.md's equations: structure, routing by hand, and a from-scratch check."""
import math

import torch
import torch.nn.functional as F
from foe_testing import fresh_copy, tokens

from foe_compile import builtin_model, convert
from foe_compile.models import FoEDecoderLayer, FoEMoE, Router
from foe_compile.kernels.reference import route as quota_top_k


def test_structure_matches_design(source, family_name):
    cfg = source.config
    model, report = convert(fresh_copy(source))
    H = report.num_groups
    assert H == math.gcd(cfg.num_key_value_heads, report.num_experts, report.top_k)
    for layer in model.model.layers:
        assert isinstance(layer, FoEDecoderLayer)
        assert len(layer.self_attn.groups) == H
        g = layer.self_attn.groups[0]
        assert g.k_proj.weight.shape[0] == cfg.num_key_value_heads // H * g.head_dim
        assert g.q_proj.weight.shape[0] == cfg.num_attention_heads // H * g.head_dim
        if isinstance(layer.mlp, FoEMoE):
            assert [grp.num_experts for grp in layer.mlp.groups] == [report.num_experts // H] * H
            assert layer.mlp.router.quota
    assert [layer.is_first for layer in model.model.layers] == [True, False, False]
    assert [layer.is_last for layer in model.model.layers] == [False, False, True]


def test_conversion_is_zero_copy(source):
    before = {p.untyped_storage().data_ptr() for p in source.parameters()}
    model, _ = convert(source)
    after = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert after <= before, "contiguous conversion must only create views of source weights"


def test_quota_routing_by_hand():
    # One token, 4 experts in 2 groups {0, 1} and {2, 3}; k = 2 -> one pick per group.
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    values, ids = quota_top_k(probs, num_groups=2, top_k=2)
    assert ids.tolist() == [[0, 2]] and torch.equal(values, probs[:, [0, 2]])  # global top-2 is {0, 1}
    router = Router(torch.zeros(4, 3), [0, 1, 2, 3], num_groups=2, top_k=2, renormalize=True, quota=True)
    ids, weights = router.route(probs, torch.float32)
    assert ids.tolist() == [[0, 2]]
    assert torch.equal(weights, probs[:, [0, 2]] / (probs[0, 0] + probs[0, 2]))
    # A permutation moves router columns with the experts: group 0 = {3, 1}, group 1 = {0, 2}.
    router = Router(torch.zeros(4, 3), [3, 1, 0, 2], num_groups=2, top_k=2, renormalize=False, quota=True)
    scores = probs[:, router.perm]
    ids, weights = router.route(scores, torch.float32)
    assert [router.perm[i].item() for i in ids[0]] == [1, 0]
    assert torch.equal(weights, probs[:, [1, 0]])


def test_every_group_gets_exactly_its_quota():
    T, E, H, k = 111, 12, 4, 8
    probs = torch.rand(T, E).softmax(-1)
    _, ids = quota_top_k(probs, H, k)
    per_group = torch.bincount(ids.flatten() // (E // H), minlength=H)
    assert per_group.tolist() == [T * k // H] * H
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all(), "no expert picked twice for a token"


@torch.no_grad()
def test_two_layers_match_equations_from_scratch():
    """Mixtral family (no q/k norm), H = 2, E = 4, k = 2: the DESIGN.md equations written out
    independently of the library, layer by layer, from the embedding to the final mean."""
    src = builtin_model("mixtral-tiny", num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, seed=3)
    ids = tokens(1, 6, seed=4)
    model, report = convert(fresh_copy(src), num_groups=2)
    assert report.num_groups == 2
    H, cfg = 2, src.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    nq, nkv = cfg.num_attention_heads // H, cfg.num_key_value_heads // H
    T = ids.shape[1]
    x = src.model.embed_tokens(ids)[0]  # [T, d]
    cos, sin = src.model.rotary_emb(x, torch.arange(T)[None])
    cos, sin = cos[0], sin[0]

    def rope(t):  # [n, T, hd]
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    def group_attention(layer, h, xin):
        a = layer.self_attn
        q = F.linear(xin, a.q_proj.weight[h * nq * hd:(h + 1) * nq * hd]).view(T, nq, hd).transpose(0, 1)
        k = F.linear(xin, a.k_proj.weight[h * nkv * hd:(h + 1) * nkv * hd]).view(T, nkv, hd).transpose(0, 1)
        v = F.linear(xin, a.v_proj.weight[h * nkv * hd:(h + 1) * nkv * hd]).view(T, nkv, hd).transpose(0, 1)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nq // nkv, 0), v.repeat_interleave(nq // nkv, 0)
        s = q @ k.transpose(1, 2) / math.sqrt(hd) + torch.full((T, T), -math.inf).triu(1)
        o = (s.softmax(-1) @ v).transpose(0, 1).reshape(T, nq * hd)
        return H * F.linear(o, a.o_proj.weight[:, h * nq * hd:(h + 1) * nq * hd])

    streams = [x, x]  # broadcast of the embedding
    for layer in src.model.layers:
        r = [streams[h] + group_attention(layer, h, layer.input_layernorm(streams[h])) for h in range(H)]
        r_full = sum(r) / H
        xn = layer.post_attention_layernorm(r_full)
        g = F.softmax(F.linear(xn, layer.mlp.gate.weight), -1)  # [T, E]
        picks = [g[:, 2 * h:2 * h + 2].max(-1) for h in range(H)]  # top-(k/H)=1 in each block of 2
        total = sum(p.values for p in picks)  # Mixtral renormalises over the k picks
        streams = []
        for h, p in enumerate(picks):
            m = torch.zeros_like(xn)
            for t in range(T):
                e = 2 * h + int(p.indices[t])
                gate, up = F.linear(xn[t], layer.mlp.experts.gate_up_proj[e]).chunk(2)
                m[t] = p.values[t] / total[t] * F.linear(F.silu(gate) * up, layer.mlp.experts.down_proj[e])
            streams.append(r_full + H * m)
    expected = F.linear(src.model.norm(sum(streams) / H), src.lm_head.weight)
    torch.testing.assert_close(model(ids).logits[0], expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_attn_stream_scale_knob_changes_only_attention_input():
    src = builtin_model("qwen3-moe-tiny", seed=1)
    ids = tokens(1, 8)
    full, _ = convert(fresh_copy(src), attn_stream_scale=None)
    one, report = convert(fresh_copy(src), attn_stream_scale=1.0)
    assert "r_full + 1*m_h" in report.layers[1].reasons[-1]
    a, b = full(ids).logits, one(ids).logits
    assert not torch.allclose(a, b)
    # c = H is the default stream exactly.
    same, _ = convert(fresh_copy(src), attn_stream_scale=float(full.foe_config.num_groups))
    assert torch.equal(same(ids).logits, a)

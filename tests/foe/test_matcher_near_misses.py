"""Near misses of the supported expert forms that the matchers must refuse by structure (each with its own
reason, never left to translation validation), next to the close relatives they still convert."""
import pytest
import torch
import torch.nn.functional as F
from foe_testing import EXACT_MAX_REL, max_rel
from handwritten_moes import ParallelExperts, SortSplit, WhereIndexAdd, with_experts
from handwritten_routers import DenseWeightedInput
from handwritten_near_misses import PrunedThroughView
from user_models import SwiGLU, UserMoETransformer

from foe_compile import convert

VOCAB = 96


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def model_with(moe_cls) -> torch.nn.Module:
    torch.manual_seed(0)
    return UserMoETransformer(moe_cls, vocab=VOCAB, experts=4, top_k=2).eval()


class CountsIn(ParallelExperts):
    """JetMoE's parallel experts with the pick counts summed in `count_dtype` (a scatter of ones), then .long()."""

    count_dtype = torch.bfloat16

    def counts(self, h, w, ids):
        return torch.zeros(h.shape[0], self.num_experts, dtype=self.count_dtype).scatter(1, ids, 1).sum(0).long().tolist()


class CountsInHalf(CountsIn):
    count_dtype = torch.float16


class CountsInFloat(CountsIn):
    count_dtype = torch.float32


class CountsInInt(CountsIn):
    count_dtype = torch.int32


class SortSplitAlpha(SortSplit):
    """The sorted combine index_add_ with alpha=2: every expert output added twice."""

    def combine(self, out, token, y):
        return out.index_add_(0, token, y, alpha=2.0)


class ScatterAddNarrowIndex(WhereIndexAdd):
    """scatter_add_ with the [n, 1] token column as index: only column 0 of each expert output is added."""

    def combine(self, out, token, y, h):
        out.scatter_add_(0, token[:, None], y)
        return out


class ComparedWith(WhereIndexAdd):
    """Expert 1's picks selected by ids == `one` (1.5 selects nothing; 1.0 is expert 1)."""

    one = 1.5

    def picks(self, ids, e):
        return torch.where(ids == (self.one if e == 1 else e))


class ComparedWithIntegralFloat(ComparedWith):
    one = 1.0


class SortSplitWeightsViaBf16(SortSplit):
    """The sorted routing weights rounded through bfloat16 in a float32 model."""

    def factor(self, w, order, h):
        return w.flatten().to(torch.bfloat16).to(h.dtype)[order, None]


class SortSplitTokenWritten(SortSplit):
    """The token index overwritten in place (through a view) after the gather: the combine adds into other rows."""

    def combine(self, out, token, y):
        token[:1] = 0
        return super().combine(out, token, y)


class LoopWeightsViaBf16(WhereIndexAdd):
    """A per-expert loop whose routing weights are rounded through bfloat16 in a float32 model."""

    def factor(self, w, token, slot, h):
        return w[token, slot, None].to(torch.bfloat16).to(h.dtype)


class WeightsPrunedThroughView(PrunedThroughView):
    """Routing weights below 0.1 zeroed in place through a view after the router (never hit at init)."""

    threshold = 0.1


class LoopOutputsViaFp8(WhereIndexAdd):
    """A per-expert loop whose weighted outputs are rounded through float8 before the combine."""

    def combine(self, out, token, y, h):
        return super().combine(out, token, y.to(torch.float8_e4m3fn).to(h.dtype), h)


def _experts_with(unit_cls):
    return with_experts(WhereIndexAdd, unit_cls, unit_cls.__name__ + "Experts")


class Fp8Gate(SwiGLU):
    """The gate rounded through float8 inside the unit."""

    def forward(self, x):
        return self.w2(F.silu(self.w1(x).to(torch.float8_e4m3fn).to(x.dtype)) * self.w3(x))


class IntGate(SwiGLU):
    """The gate truncated to integers inside the unit."""

    def forward(self, x):
        return self.w2(F.silu(self.w1(x).long().to(x.dtype)) * self.w3(x))


class WidenedGate(SwiGLU):
    """The activation computed in float64 and cast back: no value of the projection is lost."""

    def forward(self, x):
        return self.w2(F.silu(self.w1(x).double()).to(x.dtype) * self.w3(x))


class DenseFp8Weights(DenseWeightedInput):
    """Llama 4's dense experts with the gate_up weights rounded through float8 (fp8 emulation)."""

    def project(self, routed):
        gate, up = torch.bmm(routed, self.gate_up.to(torch.float8_e4m3fn).to(routed.dtype)).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.down)


REFUSED = [
    (CountsIn, "the per-expert pick counts are held in torch.bfloat16"),
    (CountsInHalf, "the per-expert pick counts are held in torch.float16"),
    (SortSplitAlpha, "sort + split: combine index_add with alpha=2.0"),
    (ScatterAddNarrowIndex, "scatter_add's index is not the token column expanded to the expert output's full shape"),
    (ComparedWith, "per-expert loop compares the expert ids with 1.5, which is no expert's id"),
    (SortSplitWeightsViaBf16, "sort + split: the routing weights are cast to torch.bfloat16"),
    (SortSplitTokenWritten, "writes into the sort order or the token index in place"),
    (LoopWeightsViaBf16, "scaled by routing weights cast to torch.bfloat16"),
    (WeightsPrunedThroughView, "scaled by routing weights that masked_fill_"),
    (LoopOutputsViaFp8, "per-expert outputs are cast to torch.float8_e4m3fn"),
    (_experts_with(Fp8Gate), "expert unit casts to torch.float8_e4m3fn"),
    (_experts_with(IntGate), "expert unit casts to torch.int64"),
]


@torch.no_grad()
@pytest.mark.parametrize("moe_cls, reason", REFUSED, ids=lambda c: getattr(c, "__name__", ""))
def test_near_misses_are_refused_by_the_matcher(moe_cls, reason):
    with pytest.raises(ValueError, match="no MoE block of UserMoETransformer can be rewritten exactly") as err:
        convert(model_with(moe_cls), mode="exact", calibration_inputs=tokens(2, 7))
    assert reason in str(err.value)
    assert "translation validation" not in str(err.value)


@torch.no_grad()
@pytest.mark.parametrize("moe_cls", [CountsInFloat, CountsInInt, ComparedWithIntegralFloat,
                                     _experts_with(WidenedGate), DenseFp8Weights], ids=lambda c: c.__name__)
def test_their_exact_relatives_convert(moe_cls):
    model = model_with(moe_cls)
    converted, report = convert(model, mode="exact", calibration_inputs=tokens(2, 7))
    assert report.exact and not report.untouched_blocks, report.to_table()
    assert any("experts_swiglu" in str(n.target) for n in converted.graph.nodes)
    for batch, length in [(1, 5), (3, 4)]:
        x = tokens(batch, length, seed=length)
        assert max_rel(converted(x), model(x)) <= EXACT_MAX_REL

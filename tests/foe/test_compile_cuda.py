"""torch.compile(backend="foe") on a CUDA device (lent GPU; skipped elsewhere): the compiled graph's
foe:: ops dispatch to the CUDA/Triton kernels and agree with the module-level conversion."""
import copy

import pytest
import torch
from foe_testing import max_rel, tokens

from foe_compile import builtin_model, convert

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# fp32 models; Triton's tl.dot may use TF32, hence a tolerance above the CPU suite's 1e-5.
CUDA_MAX_REL = 2e-2


@torch.no_grad()
@pytest.mark.parametrize("mode", ["exact", "foe"])
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_backend_on_cuda(mode, compiler):
    torch._dynamo.reset()
    model = builtin_model("olmoe-tiny", device="cuda")
    reference = convert(copy.deepcopy(model), mode=mode)[0] if mode == "foe" else model
    compiled = torch.compile(model, backend="foe", fullgraph=True, options={"mode": mode, "compiler": compiler})
    for length in (9, 17):  # the second length runs the symbolic-size graph
        ids = tokens(2, length, seed=length).cuda()
        expected = reference(ids, use_cache=False).logits
        assert max_rel(compiled(ids, use_cache=False).logits, expected) <= CUDA_MAX_REL
    torch._dynamo.reset()


@torch.no_grad()
def test_converted_model_compiles_on_cuda():
    torch._dynamo.reset()
    model, _ = convert(builtin_model("qwen3-moe-tiny", device="cuda"), mode="foe")
    ids = tokens(2, 9).cuda()
    expected = model(ids, use_cache=False).logits
    assert max_rel(torch.compile(model, backend="foe", fullgraph=True)(ids, use_cache=False).logits,
                   expected) <= CUDA_MAX_REL
    torch._dynamo.reset()

"""Compile the Triton experts kernels for sm_90 without a GPU (Triton's bundled ptxas), once per
distinct shipped launch configuration, with the argument specialisations a real launch gets
(unit strides constant, 16-divisible sizes and pointers marked). Prints {config: [gate_up, down]
shared-memory bytes} as JSON. Run in a process WITHOUT TRITON_INTERPRET (test_triton_experts.py
does); `python tests/foe/triton_aot.py`.
"""
from __future__ import annotations

import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from foe_compile.kernels import launch_configs, triton_experts as te

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = ("alpha", "limit", "up_offset")  # the expert unit's runtime scalars


def compile_shared(fn, pointers: dict, ints: dict, unit: tuple, consts: dict, options: dict) -> int:
    """Shared memory of `fn` compiled for TARGET; `ints` values give 16-divisibility hints; a pointer
    given as None is an absent optional tensor (a constexpr None, as a launch with None passes it)."""
    signature, attrs, consts = {}, {}, dict(consts)
    for i, name in enumerate(fn.arg_names):
        if name in pointers and pointers[name] is None:
            signature[name], consts[name] = "constexpr", None
        elif name in pointers:
            signature[name], attrs[(i,)] = pointers[name], [["tt.divisibility", 16]]
        elif name in unit:
            signature[name], consts[name] = "constexpr", 1
        elif name in consts:
            signature[name] = "constexpr"
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if ints.get(name, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs), target=TARGET,
                            options=options)
    return kernel.metadata.shared


def shared_bytes(E: int, I: int, d: int, cfg: dict) -> tuple[int, int]:
    """The plain SiLU SwiGLU: the gated variants share its tiles, the ungated one has fewer; the first kernel
    also with the routing weight on its input (weight_input: one more [BM] load and a scale of the x tile)."""
    common = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_E=te._pow2(E, 2), PRECISION="tf32", UPCAST=False)
    bf16 = "*bf16"
    gu, dn = cfg["gate_up"], cfg["down"]
    bn, bk = min(gu["BLOCK_N"], te._pow2(I)), min(gu["BLOCK_K"], te._pow2(d))
    a = max(compile_shared(
        te._gate_up_swiglu_kernel,
        dict(x_ptr=bf16, w_ptr=bf16, b_ptr=None, h_ptr=bf16, pairs_ptr="*i64", offsets_ptr="*i64", rw_ptr=bf16),
        dict(E=E, I=I, d=d, k=8, num_pid_m=3, stride_xt=d, stride_we=2 * I * d, stride_wn=d, stride_rt=8),
        ("stride_xd", "stride_wd", "stride_rk"),
        dict(common, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gu["GROUP_M"], EVEN_K=d % bk == 0, ACTIVATION="silu",
             HAS_BIAS=False, HAS_LIMIT=False, WEIGHT_INPUT=weight_input),
        dict(num_warps=gu["num_warps"], num_stages=gu["num_stages"])) for weight_input in (False, True))
    bn, bk = min(dn["BLOCK_N"], te._pow2(d)), min(dn["BLOCK_K"], te._pow2(I))
    b = compile_shared(
        te._down_weighted_kernel,
        dict(h_ptr=bf16, w_ptr=bf16, b_ptr=None, y_ptr=bf16, pairs_ptr="*i64", offsets_ptr="*i64", rw_ptr=bf16),
        dict(E=E, I=I, d=d, k=8, num_pid_m=3, stride_we=I * d, stride_wn=I, stride_rt=8), ("stride_wk", "stride_rk"),
        dict(common, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=dn["GROUP_M"], EVEN_K=I % bk == 0, HAS_BIAS=False,
             WEIGHT_INPUT=False),
        dict(num_warps=dn["num_warps"], num_stages=dn["num_stages"]))
    return a, b


def main() -> None:
    result, seen = {}, set()
    for path in sorted(launch_configs.CONFIG_DIR.glob("*.json")):
        E, I, d = (int(part.split("=")[1]) for part in path.name.split(",")[:3])
        for T, cfg in json.loads(path.read_text())["configs"].items():
            key = json.dumps([E, I, d, cfg], sort_keys=True)
            if key not in seen:
                seen.add(key)
                result[f"E={E},I={I},d={d},T={T}"] = shared_bytes(E, I, d, cfg)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

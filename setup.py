"""Build script: the pure-Python package plus the private extension foe_compile._C.

The C++ CPU kernels are always built (torch.utils.cpp_extension, ninja); the CUDA kernels join when
the installed torch is a CUDA build and nvcc is found (CUDA_HOME). torch must be importable at build
time, so install with `pip install -e . --no-build-isolation` (the Makefile does). Knobs:
    FOE_BUILD_EXTENSION=0   skip the extension (pure Python; the reference kernels still work)
    TORCH_CUDA_ARCH_LIST    CUDA architectures, default "9.0" (H100/H200)
    MAX_JOBS                parallel compile jobs (ninja)
"""
import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CPU_SOURCES = ["csrc/checks.cpp", "csrc/route_dispatch_cpu.cpp", "csrc/experts_swiglu_cpu.cpp",
               "csrc/register.cpp", "csrc/module.cpp"]
CUDA_SOURCES = ["csrc/route_dispatch_cuda.cu", "csrc/experts_swiglu_cuda.cu"]


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def _nvcc_major(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    except OSError:
        return None
    found = re.search(r"release (\d+)\.", out.stdout)
    return found[1] if found else None


def _extensions():
    if os.environ.get("FOE_BUILD_EXTENSION", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("setup.py: torch is not importable at build time, so foe_compile._C is not built; "
              "install with `pip install -e . --no-build-isolation` to build it", file=sys.stderr)
        return [], {}

    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    if with_cuda and _nvcc_major(cpp_extension.CUDA_HOME) != torch.version.cuda.split(".")[0]:
        # cpp_extension refuses a CUDA major-version mismatch; the CuPy backend still gives the CUDA kernels.
        print(f"setup.py: nvcc in {cpp_extension.CUDA_HOME} is not CUDA {torch.version.cuda}'s major version: "
              "building the CPU kernels only", file=sys.stderr)
        with_cuda = False
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    defines = [f'-DFOE_TORCH_VERSION="{torch.__version__}"', f'-DFOE_GIT_COMMIT="{_git_commit()}"']
    cxx = ["-O3", "-fopenmp-simd", *defines]  # the C++ standard comes from cpp_extension (torch-specific)
    if not with_cuda:
        ext = cpp_extension.CppExtension("foe_compile._C", CPU_SOURCES, include_dirs=[str(ROOT / "csrc")],
                                         extra_compile_args={"cxx": cxx})
    else:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        cuda_defines = ["-DFOE_WITH_CUDA", f'-DFOE_CUDA_ARCHS="{archs}"']
        ext = cpp_extension.CUDAExtension("foe_compile._C", CPU_SOURCES + CUDA_SOURCES,
                                          include_dirs=[str(ROOT / "csrc")],
                                          extra_compile_args={"cxx": cxx + cuda_defines,
                                                              "nvcc": ["-O3", *defines, *cuda_defines]})
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

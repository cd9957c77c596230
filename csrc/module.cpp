// foe_compile._C: loads the foe::*_native kernels (static registration in register.cpp and the .cu files)
// and exposes non-tensor helpers: build information.
#include <pybind11/pybind11.h>

#include <ATen/Parallel.h>

#ifndef FOE_TORCH_VERSION
#define FOE_TORCH_VERSION "unknown"
#endif
#ifndef FOE_GIT_COMMIT
#define FOE_GIT_COMMIT "unknown"
#endif
#ifndef FOE_CUDA_ARCHS
#define FOE_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["torch_version"] = FOE_TORCH_VERSION;  // torch.__version__ the extension was compiled against
  info["git_commit"] = FOE_GIT_COMMIT;
  info["compiler"] = __VERSION__;
#ifdef FOE_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = FOE_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
  info["parallel"] = at::get_parallel_info();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "foe_compile native kernels (registered as torch.ops.foe.*_native) and build information";
  m.def("build_info", &build_info,
        "dict: torch_version, git_commit, compiler, cuda (bool), cuda_archs, parallel (ATen threading)");
}

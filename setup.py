"""Builds densefuse._C: C++ CPU kernels always, CUDA kernels when a CUDA torch and nvcc are present.

csrc/cpu/*.cpp   CPU kernels (at::parallel_for, OpenMP SIMD).
csrc/cuda/*.cu   CUDA kernels with no torch headers (plain pointers + cudaStream_t).
csrc/ops.cpp     TORCH_LIBRARY bindings for the densefuse_ext:: ops and the pybind11 module.

DENSEFUSE_NO_CUDA=1 skips the CUDA sources even where they could be built.
"""

import glob
import os
import sysconfig

from setuptools import setup
from torch.utils import cpp_extension


def _cuda_buildable() -> bool:
    if os.environ.get("DENSEFUSE_NO_CUDA", "0") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    include_dirs = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")]
    # -fno-trapping-math lets GCC if-convert the kernels' selects into blends on AVX2/SSE (values,
    # NaN and Inf are unchanged; only FP exception flags are not preserved). -ffp-contract=off: a
    # product is rounded before it is added (no multiply-add), as torch's references do, so that the
    # patch scatter gives their bits on every x86-64 level. No -ffast-math.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fopenmp-simd", "-fno-trapping-math", "-ffp-contract=off"]
    define_macros = []
    if sysconfig.get_platform().endswith("x86_64"):
        define_macros.append(("DENSEFUSE_X86", "1"))
    if _cuda_buildable():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        define_macros += [("DENSEFUSE_WITH_CUDA", "1"), ("DENSEFUSE_CUDA_ARCHS", f'"{archs}"')]
        return cpp_extension.CUDAExtension(
            "densefuse._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "densefuse._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)

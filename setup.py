"""Builds fastvote._C: the C++ ops always, the CUDA ops when nvcc and a CUDA
build of torch are present (FASTVOTE_CUDA=0/1 forces the choice).

Environment knobs:
  FASTVOTE_CUDA=0|1      build the CUDA sources (default: when possible)
  FASTVOTE_NATIVE=1      add -march=native (off by default: wheels must run anywhere)
  FASTVOTE_DEBUG=1       -O0 -g instead of -O3 -g0
"""
import glob
import os
import shutil

# These must be set before torch.utils.cpp_extension is imported: it reads them
# at import time. The nvcc on PATH may be a wrapper script, which makes torch
# guess the wrong CUDA root; with no GPU and no arch list the build dies.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("FASTVOTE_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None and shutil.which(
        os.path.join(CUDA_HOME, "bin", "nvcc")) is not None


def extension():
    debug = os.environ.get("FASTVOTE_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx = opt + ["-fopenmp"]  # torch's own -std flag applies (C++20 for torch 2.10+)
    if os.environ.get("FASTVOTE_NATIVE") == "1":
        cxx.append("-march=native")
    sources = ["csrc/vote.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(
        name="fastvote._C",
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=["-fopenmp"],
    )
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            sources=sources,
            define_macros=[("FASTVOTE_WITH_CUDA", "1")],
            # nvcc rejects -g0; host-side -g0 comes through "cxx".
            extra_compile_args={"cxx": cxx, "nvcc": ["-O0", "-g"] if debug else ["-O3"]},
            **kwargs,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

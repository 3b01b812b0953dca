"""Build sparq_ext: the C++ extension when a compiler and torch are present, CUDA kernels when a
CUDA toolkit is found (or ``FORCE_CUDA=1``). With neither, the package still installs and runs
on its pure-torch implementation.

Environment (PyTorch conventions):
  FORCE_CUDA=1              build the CUDA kernels even with no GPU visible
  SPARQ_EXT_NO_BUILD=1      skip all native code (pure-torch package)
  SPARQ_EXT_NO_CUDA=1       never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST      GPU architectures (default "8.0;9.0+PTX")
  MAX_JOBS                  parallel compile jobs (read by torch's ninja build)
  CUDA_HOME                 CUDA toolkit root (default: found from nvcc, /usr/local/cuda)
  SPARQ_CPU_ARCH            -march for the CPU kernels (default "native"; e.g. "x86-64-v3")
Install with ``pip install --no-build-isolation .`` so the build sees your installed torch.
"""

import glob
import importlib.util
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _guess_cuda_home():
    """A toolkit root holding include/cuda_runtime.h, found before torch guesses one."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _pip_cuda_include_dirs():
    """Headers shipped in pip's nvidia-* packages (cusparse.h and friends for CUDA 13)."""
    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for base in (spec.submodule_search_locations or []) if spec else []:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    return dirs


def _extensions():
    if _env_flag("SPARQ_EXT_NO_BUILD"):
        return [], {}
    if importlib.util.find_spec("torch") is None:
        warnings.warn("sparq_ext: torch is not importable at build time, so only the pure-torch "
                      "implementation is installed. Install torch first and build with "
                      "`pip install --no-build-isolation .` for the native kernels.")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        warnings.warn("sparq_ext: no C++ compiler found; installing the pure-torch implementation")
        return [], {}

    with_cuda = False
    if not _env_flag("SPARQ_EXT_NO_CUDA"):
        cuda_home = _guess_cuda_home()
        if cuda_home and not os.environ.get("CUDA_HOME"):
            os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
        import torch

        with_cuda = _env_flag("FORCE_CUDA") or (cuda_home is not None
                                                and torch.version.cuda is not None)
        if with_cuda and (cuda_home is None or torch.version.cuda is None):
            raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch and a CUDA toolkit "
                               f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cuda_home})")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu_arch = os.environ.get("SPARQ_CPU_ARCH", "native")
    cxx_flags = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas",
                 "-fopenmp", f"-march={cpu_arch}"]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    macros = [("SPARQ_WITH_CPU", "1")] if len(sources) > 1 else []
    kwargs = dict(name="sparq_ext._C", include_dirs=include_dirs,
                  extra_link_args=["-fopenmp"], py_limited_api=False)
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    if with_cuda and cuda_sources:
        sources += cuda_sources
        include_dirs += _pip_cuda_include_dirs()
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo",
                      "--expt-relaxed-constexpr", "-Xcompiler=-Wall", "-Werror=all-warnings"]
        ext = CUDAExtension(sources=sources, define_macros=macros + [("SPARQ_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **kwargs)
    else:
        ext = CppExtension(sources=sources, define_macros=macros, extra_compile_args={"cxx": cxx_flags}, **kwargs)
    print(f"sparq_ext: building the C++ extension ({'CPU + CUDA' if with_cuda and cuda_sources else 'CPU only'})",
          file=sys.stderr)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["sparq_ext", "sparq_ext.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

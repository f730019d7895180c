"""Build of the longnet extension (longnet._C).

The default build has the CPU operators and engines (``fused``, ``cpu_flash``,
``math``), and, where a GPU is visible and torch is a CUDA build, the CUDA operators
with the engines on ATen's CUDA kernels (``cuda_flash``, ``cuda_cudnn``,
``cuda_efficient``, ``math``). Environment variables:

* ``LONGNET_FORCE_CUDA=1``: a CUDA build even without a visible GPU (needs nvcc and a
  CUDA build of torch).
* ``LONGNET_NO_CUDA=1``: never a CUDA build.
* ``LONGNET_FUSED_CUDA=1``: also compile the ``fused`` engine's CUDA kernels
  (csrc/cuda/*.cu, defines LONGNET_FUSED_CUDA); a CUDA build, as with
  ``LONGNET_FORCE_CUDA=1``. Without it ``fused`` runs on CPU only.
* ``LONGNET_BUILD_TESTING=1``: a testing build (defines LONGNET_TESTING): compiles the
  CPU contract engines (csrc/testing/*.cpp, reached through ``longnet.testing``) and
  the ``LONGNET_DEBUG_SKIP_ROW`` switch of the fused kernels. The tests need it; CI
  sets it.
* ``LONGNET_CUDA_ARCHS``: semicolon-separated compute capabilities, default
  ``"8.0;9.0"`` (A100, H100/H200); PTX is embedded for the newest one.
* ``LONGNET_DEBUG=1``: ``-O0 -g`` build (else ``-O3``, and C++ without debug info).
* ``LONGNET_WERROR=1``: compiler warnings are errors (``-Wall -Wextra`` always warn, in
  C++ and in the host code of the CUDA files; nvcc's own warnings too). CI sets it.
* ``MAX_JOBS``: parallel compile jobs (ninja).
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import (
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
    include_paths,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda(fused_cuda: bool) -> bool:
    """Whether this is a CUDA build; ``fused_cuda`` (LONGNET_FUSED_CUDA=1) asks for one."""
    forced = _env_flag("LONGNET_FORCE_CUDA") or fused_cuda
    why = "LONGNET_FUSED_CUDA=1" if fused_cuda else "LONGNET_FORCE_CUDA=1"
    if _env_flag("LONGNET_NO_CUDA"):
        if fused_cuda:
            raise RuntimeError(
                "LONGNET_FUSED_CUDA=1 (the fused CUDA kernels) and LONGNET_NO_CUDA=1 "
                "(no CUDA build) contradict each other; unset one"
            )
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        if forced:
            raise RuntimeError(
                f"{why} needs a CUDA build of torch and nvcc "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
        return False
    return forced or torch.cuda.is_available()


def _gencode_flags() -> list:
    archs = [
        a.strip() for a in os.environ.get("LONGNET_CUDA_ARCHS", "8.0;9.0").split(";") if a.strip()
    ]
    flags = []
    for arch in archs:
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    newest = archs[-1].replace(".", "")
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def _system_includes(cuda: bool) -> list:
    """torch's (and CUDA's) headers as system headers, so that -Wall -Wextra report this
    project's code only (torch's headers have unused parameters, for one)."""
    dirs = include_paths() + ([os.path.join(CUDA_HOME, "include")] if cuda else [])
    return [flag for d in dirs for flag in ("-isystem", d)]


def _sources(directory: str, pattern: str = "*.cpp") -> list:
    """The files of csrc/<directory> matching ``pattern``, relative to the repository."""
    found = sorted(glob.glob(os.path.join(HERE, "csrc", directory, pattern)))
    return [os.path.relpath(p, HERE) for p in found]


def make_extension():
    debug = _env_flag("LONGNET_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    werror = _env_flag("LONGNET_WERROR")
    warnings = ["-Wall", "-Wextra"] + (["-Werror"] if werror else [])
    fused_cuda = _env_flag("LONGNET_FUSED_CUDA")
    testing = _env_flag("LONGNET_BUILD_TESTING")
    cuda = _want_cuda(fused_cuda)
    # One macro per optional part, seen by every file (C++ and CUDA), which keeps the
    # parts a file has in step with the sources listed below: csrc/engine/engines_cuda.cpp
    # is empty without LONGNET_WITH_CUDA, csrc/engine/kernel_contract.cpp without
    # LONGNET_WITH_CUDA and LONGNET_TESTING.
    defines = (
        (["-DLONGNET_WITH_CUDA"] if cuda else [])
        + (["-DLONGNET_FUSED_CUDA"] if fused_cuda else [])
        + (["-DLONGNET_TESTING"] if testing else [])
    )
    # Python's CFLAGS carry -g; a release build drops the debug info (-g0), which
    # halves the time to compile a file that includes ATen and shrinks the library.
    cxx_flags = (
        opt
        + ([] if debug else ["-g0"])
        + ["-std=c++20", "-fopenmp", "-fvisibility=hidden"]
        + warnings
        + _system_includes(cuda)
        + defines
    )
    # Operators, fused CPU kernels, engine registry, composition and dense engines.
    sources = _sources("") + _sources("cpu") + _sources("engine")
    if testing:
        sources += _sources("testing")  # the contract engines
    if fused_cuda:
        sources += _sources("cuda", "*.cu")  # the fused engine's CUDA kernels
    common = dict(
        name="longnet._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if cuda:
        nvcc_flags = (
            opt
            + ["-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"]
            + _gencode_flags()
            + _system_includes(cuda)
        )
        # Host code: the C++ warnings; nvcc's own (device code included) as errors too.
        nvcc_flags += ["-Xcompiler", ",".join(warnings)]
        if werror:
            nvcc_flags += ["-Werror", "all-warnings"]
        return CUDAExtension(
            sources=sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags + defines},
            **common,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)


setup(
    packages=find_packages(include=["longnet", "longnet.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

"""Build ldm and its C++/CUDA extension `ldm._C`.

    pip install --no-build-isolation -e .

Environment switches (read only here, at build time):
  LDM_CPU_ONLY=1       build the CPU sources only, even when a CUDA toolkit is present.
  LDM_REQUIRE_CUDA=1   fail when CUDA sources cannot be built (CI uses this).
  TORCH_CUDA_ARCH_LIST as usual; defaulted to "8.0;9.0+PTX" when no GPU is visible.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

# The include root is the repository, so sources write "csrc/math.h": with csrc/ itself on
# the include path, csrc/math.h would shadow the C library's <math.h> for the CUDA headers.
_ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home() -> str | None:
    """CUDA_HOME, else the toolkit that `nvcc` belongs to, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.isdir(os.environ[var]):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc on PATH may be a wrapper script outside the toolkit (some installations have one):
        # follow symlinks, then look for the `exec <toolkit>/bin/nvcc` line of a wrapper.
        real = os.path.realpath(nvcc)
        root = os.path.dirname(os.path.dirname(real))
        if os.path.isfile(os.path.join(root, "include", "cuda.h")):
            return root
        try:
            with open(real, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for token in head.split():
                if token.endswith("/bin/nvcc") and os.path.isfile(token):
                    return os.path.dirname(os.path.dirname(token))
        except OSError:
            pass
    if os.path.isfile("/usr/local/cuda/include/cuda.h"):
        return "/usr/local/cuda"
    return None


def _host_simd_flags() -> list[str]:
    """Vector ISA flags (and PyTorch's matching at::vec capability) for the build host.

    The extension is built on the machine that runs it (`pip install -e .`), so the CPU
    kernels use the widest at::vec path the host's /proc/cpuinfo flags allow: AVX-512
    (avx512f, avx512bw, avx512vl, avx512dq: the 512-bit GroupNorm+SiLU paths and the bf16
    attention kernel), else AVX2+FMA (256-bit at::vec paths, PyTorch's SDPA for attention),
    else at::vec's portable default.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line.split(":", 1)[1].split() for line in f
                              if line.startswith("flags")), []))
    except OSError:
        return []
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
        # avx512_bf16: vcvtneps2bf16 narrows 16 values in one instruction and vdpbf16ps does
        # the attention kernel's bf16 products; without it both are emulated.
        bf16 = ["-mavx512bf16"] if "avx512_bf16" in flags else []
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
                "-mf16c", *bf16, "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if {"avx2", "fma", "f16c"} <= flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def _extensions() -> list:
    import torch
    cuda_home = None if os.environ.get("LDM_CPU_ONLY") == "1" else _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension is imported
    from torch.utils import cpp_extension

    want_cuda = os.environ.get("LDM_CPU_ONLY") != "1"
    can_cuda = want_cuda and cuda_home is not None and torch.version.cuda is not None
    if os.environ.get("LDM_REQUIRE_CUDA") == "1" and not can_cuda:
        sys.exit("LDM_REQUIRE_CUDA=1 but no CUDA toolkit was found "
                 f"(CUDA_HOME={cuda_home}, torch.version.cuda={torch.version.cuda})")

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # torch >= 2.10 headers need C++20 (cpp_extension adds -std).
    cxx = ["-O3", "-fopenmp", "-DNDEBUG"] + _host_simd_flags()
    if can_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: machine code for sm_80 (Ampere) and sm_90 (Hopper), plus PTX
            # that the driver compiles for newer GPUs.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = cpp_extension.CUDAExtension(
            "ldm._C", sources, include_dirs=[_ROOT],
            extra_compile_args={"cxx": cxx + ["-DLDM_WITH_CUDA"],
                                "nvcc": ["-O3", "-DLDM_WITH_CUDA", "--use_fast_math"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "ldm._C", sources, include_dirs=[_ROOT],
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    print(f"ldm: building {'CPU+CUDA' if can_cuda else 'CPU-only'} extension "
          f"(CUDA_HOME={cuda_home})", file=sys.stderr)
    return [ext]


def _cmdclass() -> dict:
    from torch.utils.cpp_extension import BuildExtension
    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="ldm",
    version="0.1.0",
    description="Latent diffusion toolkit: KL VAE, cross-attention U-Net, OpenCLIP text, fused kernels",
    packages=find_packages(include=["ldm", "ldm.*"]),
    package_data={"ldm": ["assets/*.safetensors", "assets/*.json"]},
    python_requires=">=3.10",
    # pip install -e .[app]: the Streamlit app (streamlit run scripts/app.py)
    extras_require={"app": ["streamlit==1.64.0", "streamlit-drawable-canvas-fix==0.9.8"],
                    "openvino": ["openvino==2026.4.1"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)

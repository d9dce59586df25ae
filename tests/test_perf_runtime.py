"""Inference set-up keeps the numerics: allocator tuning, channels_last, the bf16 path, the
VAE attention's flash-kernel layout (no timing is asserted anywhere)."""
from __future__ import annotations

import torch

from ldm.config import AutoencoderConfig, UNetConfig
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.unet import UNetModel
from ldm.inference.setup import compile_for_inference, prepare_for_inference
from ldm.runtime import release_free_memory, setup_cpu, tune_allocator

from conftest import TINY_UNET as _TINY_UNET, perturb, rel_l2

TINY_UNET = UNetConfig(**{**_TINY_UNET.__dict__, "context_dim": 32,
                          "use_linear_in_transformer": True})


def tiny_unet() -> UNetModel:
    torch.manual_seed(0)
    return perturb(UNetModel(TINY_UNET), 0.05)


def test_setup_cpu_sets_threads() -> None:
    before = torch.get_num_threads()
    try:
        done = setup_cpu(threads=1, allocator=False)
        assert done == {"threads": 1, "allocator_tuned": False}
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# Frees a 24 MiB tensor and prints how many MiB of resident memory that handed back to the OS.
_FREED_MIB = """
import torch
from ldm.runtime import tune_allocator
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
print(tune_allocator(dtype=torch.{dtype}))
block = torch.ones(6 * 2**20)
before = rss()
del block
print(round(before - rss()))
"""


def test_tune_allocator_keeps_blocks_below_the_dtype_threshold() -> None:
    """fp32 activations up to 32 MiB stay mapped when freed; for bf16 the limit is 8 MiB, so
    the same 24 MiB block goes back to the OS."""
    import sys

    import pytest
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    tuned, freed = _run_python(_FREED_MIB.format(dtype="float32")).split()
    assert tuned == "True" and int(freed) < 4
    tuned, freed = _run_python(_FREED_MIB.format(dtype="bfloat16")).split()
    assert tuned == "True" and int(freed) > 20


def test_release_free_memory_returns_freed_heap_pages() -> None:
    import sys

    import pytest
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert tune_allocator()  # trimming off: freed heap memory stays resident

    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    blocks = [torch.ones(2**20) for _ in range(64)]  # 64 x 4 MiB heap blocks, touched
    del blocks
    before = rss_mib()
    assert release_free_memory()
    assert rss_mib() < before - 128  # most of the 256 MiB went back to the OS


def test_channels_last_and_bf16_keep_the_unet_output() -> None:
    unet = tiny_unet().eval()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0]), torch.randn(2, 7, 32)
    with torch.inference_mode():
        ref = unet(x, t, ctx)
        fast = prepare_for_inference(unet, channels_last=True)(x, t, ctx)
        assert fast.shape == ref.shape
        assert rel_l2(fast, ref) < 1e-5
        half = prepare_for_inference(unet, torch.bfloat16, channels_last=True)(x, t, ctx)
    assert half.dtype == torch.float32  # the U-Net returns x's dtype
    assert rel_l2(half, ref) < 0.02  # the documented bf16 tolerance of the U-Net


def test_vae_attention_in_both_layouts_and_bf16() -> None:
    config = AutoencoderConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
                               resolution=16)
    torch.manual_seed(0)
    vae = AutoencoderKL(config).eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        ref = vae.decode(z)
        cl = prepare_for_inference(vae, channels_last=True).decode(z)
        assert rel_l2(cl, ref) < 1e-5
        half = prepare_for_inference(vae, torch.bfloat16).decode(z.bfloat16())
    assert rel_l2(half, ref) < 0.03


def test_compile_for_inference_matches_eager() -> None:
    # inductor with frozen (pre-packed) weights computes the same function as eager; the
    # fused GroupNorm+SiLU and the folded upsampling go through it.
    unet = prepare_for_inference(tiny_unet(), channels_last=True)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 32)
    with torch.inference_mode():
        want = unet(x, t, ctx)
        got = compile_for_inference(unet)(x, t, ctx)
    assert rel_l2(got, want) < 1e-5


def test_compile_for_inference_bf16_matches_eager() -> None:
    # bf16 weights compile too (frozen oneDNN bf16 convolutions); compiled and eager bf16 are
    # both within bf16 rounding of fp32, and close to each other.
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 32)
    with torch.inference_mode():
        want = prepare_for_inference(tiny_unet(), channels_last=True)(x, t, ctx)
        unet = prepare_for_inference(tiny_unet(), torch.bfloat16, channels_last=True)
        eager = unet(x.bfloat16(), t, ctx.bfloat16())
        got = compile_for_inference(unet)(x.bfloat16(), t, ctx.bfloat16())
    assert got.dtype == torch.bfloat16
    assert rel_l2(got, want) < 0.03 and rel_l2(got, eager) < 0.03


def _run_python(code: str, **env: str) -> str:
    """stdout of `code` in a fresh interpreter (the allocator reads its settings once)."""
    import os
    import subprocess
    import sys
    environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=environ, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_enable_huge_pages_only_before_the_first_tensor() -> None:
    import sys

    import pytest
    if not sys.platform.startswith("linux"):
        pytest.skip("transparent huge pages are a Linux feature")
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            granted = "[never]" not in f.read()
    except OSError:
        granted = False
    enable = "from ldm.runtime import enable_huge_pages, huge_pages_on\n"
    assert _run_python(enable + "print(huge_pages_on())") == "False"  # the default: off
    assert _run_python(enable + "print(enable_huge_pages(), huge_pages_on())") == \
        f"{granted} {granted}"
    # too late once a tensor exists, and an explicit 0 is respected: both report off
    assert _run_python("import torch\nt = torch.ones(8)\n" + enable +
                       "print(enable_huge_pages())") == "False"
    assert _run_python(enable + "print(enable_huge_pages())", THP_MEM_ALLOC_ENABLE="0") == "False"

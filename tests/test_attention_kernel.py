"""The fused CPU bf16 attention kernels (vdpbf16ps, AMX tiles) beside their fp32 reference and
PyTorch's bf16 SDPA."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldm._extension import fused_device_types
from ldm.cpu import cpu_info
from ldm.kernels.attention import (AMX_MAX_HEAD_DIM, attention_reference, flash_attention,
                                   fused_attention_op, uses_fused_attention)
from ldm.models.attention import CrossAttention
from conftest import rel_l2

pytestmark = pytest.mark.skipif("cpu" not in fused_device_types("flash_attention"),
                                reason="ldm._C has no CPU flash_attention (not an AVX-512 build)")
HAS_AMX = cpu_info().amx_bf16


@pytest.fixture(params=["flash_attention", "flash_attention_amx"])
def op(request):
    """Each fused kernel this CPU can run (the AMX one needs amx_bf16)."""
    if request.param == "flash_attention_amx" and not HAS_AMX:
        pytest.skip("this CPU has no AMX tiles (amx_bf16)")
    return getattr(torch.ops.ldm, request.param)


def heads_view(batch: int, heads: int, length: int, dim: int, scale: float = 1.0,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[B, H, L, D] as the U-Net makes it: a transposed view of [B, L, H * D] (not contiguous)."""
    x = torch.randn(batch, length, heads * dim) * scale
    return x.to(dtype).view(batch, length, heads, dim).transpose(1, 2)


SHAPES = [  # (B, H, N, M, D): tails in rows, keys (odd, < one chunk, > one block) and head size
    (1, 1, 1, 1, 1), (1, 1, 7, 5, 3), (2, 3, 65, 77, 40), (2, 5, 300, 257, 64),
    (1, 2, 129, 1000, 80), (1, 1, 64, 64, 160), (1, 1, 33, 17, 512), (1, 2, 40, 33, 16),
    (2, 2, 513, 300, 33)]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_as_closely_as_pytorch_bf16(op, shape):
    torch.manual_seed(0)
    b, h, n, m, d = shape
    # Logits of a few units: a peaked softmax, so the max bookkeeping matters.
    q, k, v = heads_view(b, h, n, d, 2.0), heads_view(b, h, m, d, 2.0), heads_view(b, h, m, d)
    want = attention_reference(q.float(), k.float(), v.float())
    got = op(q, k, v, 1 / math.sqrt(d))
    assert got.shape == (b, h, n, d) and got.dtype == torch.bfloat16
    torch_bf16 = F.scaled_dot_product_attention(q, k, v)
    # Both round the output to bf16 (rel. 2e-3); ours may add bf16 rounding of P, not more.
    assert rel_l2(got, want) <= 1.1 * rel_l2(torch_bf16, want) + 1e-4
    assert rel_l2(got, want) < 4e-3


def test_output_layout_makes_the_merge_of_heads_free(op):
    q = heads_view(2, 3, 10, 8)
    out = op(q, q, q, 0.3)
    merged = out.transpose(1, 2).reshape(2, 10, 24)
    assert merged.data_ptr() == out.data_ptr() and merged.is_contiguous()


@pytest.mark.parametrize("layout", ["contiguous", "strided_rows", "transposed_last"])
def test_any_input_strides(op, layout):
    torch.manual_seed(1)
    q, k, v = heads_view(1, 2, 20, 16), heads_view(1, 2, 30, 16), heads_view(1, 2, 30, 16)
    if layout == "contiguous":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    elif layout == "strided_rows":  # every other row of a longer tensor
        q, k, v = (torch.cat([t, t], dim=2)[:, :, ::2] for t in (q, k, v))
    else:  # elements of a row not adjacent: the kernel makes them so
        q = q.transpose(2, 3).contiguous().transpose(2, 3)
    want = attention_reference(q.float(), k.float(), v.float(), scale=0.2)
    got = op(q, k, v, 0.2)
    assert rel_l2(got, want) < 4e-3


def test_large_logits_stay_finite_and_exact_one_hot(op):
    # Very peaked softmax (logits up to ~1e3): the running max keeps 2^(S - m) in range.
    q = torch.zeros(1, 1, 3, 4, dtype=torch.bfloat16)
    k = torch.zeros(1, 1, 300, 4, dtype=torch.bfloat16)
    q[..., 0] = 40.0
    k[0, 0, 280, 0] = 50.0  # the one key that wins, in the second key block
    v = torch.randn(1, 1, 300, 4).to(torch.bfloat16)
    got = op(q, k, v, 1.0)
    torch.testing.assert_close(got, v[:, :, 280:281].expand(1, 1, 3, 4), atol=0, rtol=0)


def test_deterministic(op):
    q, k, v = heads_view(2, 2, 100, 64), heads_view(2, 2, 90, 64), heads_view(2, 2, 90, 64)
    first = op(q, k, v, 0.125)
    for _ in range(3):
        assert torch.equal(op(q, k, v, 0.125), first)


def test_opcheck(op):
    q, k, v = heads_view(1, 2, 9, 8), heads_view(1, 2, 11, 8), heads_view(1, 2, 11, 8)
    torch.library.opcheck(op, (q, k, v, 0.35))


@pytest.mark.parametrize("bad, message", [
    (lambda q, k, v: (q.float(), k, v), "bfloat16"),
    (lambda q, k, v: (q[0], k, v), r"\[B, H, L, D\]"),
    (lambda q, k, v: (q, k[:, :1], v[:, :1]), "equal batch and heads"),
    (lambda q, k, v: (q, k, v[..., :4]), "equal batch and heads"),
    (lambda q, k, v: (q[..., :4], k, v), "head sizes differ"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "no keys"),
])
def test_bad_input_raises_clear_error(op, bad, message):
    q, k, v = heads_view(1, 2, 5, 8), heads_view(1, 2, 6, 8), heads_view(1, 2, 6, 8)
    with pytest.raises(RuntimeError, match=message):
        op(*bad(q, k, v), 0.3)


@pytest.mark.skipif(HAS_AMX, reason="this CPU has AMX tiles")
def test_amx_kernel_without_amx_says_so():
    q = heads_view(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="does not allow AMX"):
        torch.ops.ldm.flash_attention_amx(q, q, q, 0.3)


@pytest.mark.parametrize("amx", [False, True])
def test_each_cpu_gets_its_kernel(monkeypatch, amx):
    monkeypatch.setattr("ldm.kernels.attention._AMX", amx)
    q = heads_view(1, 2, 6, 8)
    want = torch.ops.ldm.flash_attention_amx if amx else torch.ops.ldm.flash_attention
    assert fused_attention_op() is want and uses_fused_attention(q, q, q)
    # On AMX, SDPA takes head sizes where the tiles lose to it.
    wide = heads_view(1, 1, 4, AMX_MAX_HEAD_DIM + 16)
    assert uses_fused_attention(wide, wide, wide) is not amx
    if amx == HAS_AMX:
        torch.testing.assert_close(flash_attention(q, q, q), want(q, q, q, 8 ** -0.5))


def test_amx_needs_the_os_as_well_as_the_flag(monkeypatch):
    from ldm.cpu import CpuInfo
    from ldm.kernels.attention import _amx_tiles_usable
    amx = CpuInfo("Xeon", "family 6 model 143", frozenset({"avx512_bf16", "amx_bf16", "amx_tile"}))
    monkeypatch.setattr("ldm.kernels.attention.cpu_info", lambda: amx)
    monkeypatch.setattr(torch._C._cpu, "_init_amx", lambda: False)  # an OS that says no
    assert not _amx_tiles_usable()
    monkeypatch.setattr(torch._C._cpu, "_init_amx", lambda: True)
    assert _amx_tiles_usable()


def test_head_size_limit(op):
    x = heads_view(1, 1, 4, 520)
    with pytest.raises(RuntimeError, match="head size"):
        op(x, x, x, 0.1)
    assert not uses_fused_attention(x, x, x)  # the Python face sends it to SDPA instead
    torch.testing.assert_close(flash_attention(x, x, x), F.scaled_dot_product_attention(x, x, x))


def test_dispatch_keeps_autograd_on_sdpa():
    q, k, v = heads_view(1, 2, 6, 8), heads_view(1, 2, 6, 8), heads_view(1, 2, 6, 8)
    assert uses_fused_attention(q, k, v)
    assert not uses_fused_attention(q.float(), k.float(), v.float())
    q.requires_grad_(True)
    assert not uses_fused_attention(q, k, v)
    with torch.no_grad():
        assert uses_fused_attention(q, k, v)
    out = flash_attention(q, k, v)
    out.float().sum().backward()  # SDPA's backward ran
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_cross_attention_module_bf16_matches_fp32():
    torch.manual_seed(2)
    layer = CrossAttention(query_dim=64, context_dim=48, heads=4, dim_head=16).eval()
    x, context = torch.randn(2, 70, 64), torch.randn(2, 77, 48)
    with torch.no_grad():
        want = layer(x, context)
        got = layer.to(torch.bfloat16)(x.bfloat16(), context.bfloat16())
    assert rel_l2(got, want) < 2e-2


def test_compile_fullgraph():
    q, k, v = heads_view(1, 2, 9, 8), heads_view(1, 2, 11, 8), heads_view(1, 2, 11, 8)
    compiled = torch.compile(lambda a, b, c: flash_attention(a, b, c) * 2, fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), flash_attention(q, k, v) * 2)

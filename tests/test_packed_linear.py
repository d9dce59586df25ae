"""oneDNN-packed linear weights and the fused GEGLU (ldm.models.packed_linear) against the
plain modules."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_UNET, perturb, rel_l2
from torch import nn

from ldm.inference.setup import choose_packed_linear, prepare_for_inference
from ldm.models.attention import GEGLU
from ldm.models.packed_linear import PackedLinear, available, is_packed_linear, set_packed_linear
from ldm.models.unet import UNetModel

pytestmark = pytest.mark.skipif(not available(), reason="this PyTorch has no oneDNN packed linears")

BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported() if available() else False
DTYPES = [(torch.float32, 1e-5)] + ([(torch.bfloat16, 1e-2)] if BF16 else [])


def geglu_reference(module: GEGLU, x: torch.Tensor) -> torch.Tensor:
    """x W_a * gelu(x W_g) in fp64."""
    value, gate = F.linear(x.double(), module.proj.weight.double(),
                           module.proj.bias.double()).chunk(2, dim=-1)
    return value * F.gelu(gate)


@pytest.mark.parametrize("dtype, tolerance", DTYPES)
@pytest.mark.parametrize("shape, bias", [((5, 24), True), ((2, 7, 24), False),
                                         ((1, 1, 3, 24), True)])
def test_packed_linear_matches_linear(dtype: torch.dtype, tolerance: float,
                                      shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias).to(dtype)
    x = torch.randn(shape).to(dtype)
    with torch.no_grad():
        want = F.linear(x.double(), linear.weight.double(),
                        None if linear.bias is None else linear.bias.double())
        assert set_packed_linear(linear, True) == 1 and type(linear) is PackedLinear
        got = linear(x)
    assert linear.packed_weight._packed is not None  # the packed path ran
    assert got.shape == want.shape and got.dtype == dtype
    assert rel_l2(got.double(), want) < tolerance


def test_strided_input_and_weight_update() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(16, 8)
    set_packed_linear(linear, True)
    x = torch.randn(6, 32)[:, ::2]  # not contiguous
    with torch.no_grad():
        assert rel_l2(linear(x), F.linear(x, linear.weight, linear.bias)) < 1e-6
        linear.weight.mul_(-2)  # in place: the packed copy must follow
        assert rel_l2(linear(x), F.linear(x, linear.weight, linear.bias)) < 1e-6


@pytest.mark.parametrize("dtype", [d for d, _ in DTYPES])
def test_fused_geglu_against_fp64(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    geglu = GEGLU(32, 48).to(dtype)
    x = torch.randn(2, 9, 32).to(dtype)
    with torch.inference_mode():
        want = geglu_reference(geglu, x)
        eager = geglu(x)
        set_packed_linear(geglu, True)
        fused = geglu(x)
    assert geglu.packing and geglu.packed_halves[0]._packed is not None
    # bf16: one rounding of the result instead of three roundings on the way, so at least as
    # close to the exact value as eager bf16
    assert rel_l2(fused.double(), want) <= max(1e-6, 1.2 * rel_l2(eager.double(), want))


def test_training_takes_the_plain_path_with_gradients() -> None:
    torch.manual_seed(3)
    geglu = GEGLU(16, 8)
    set_packed_linear(geglu, True)
    x = torch.randn(4, 16, requires_grad=True)
    geglu(x).square().sum().backward()
    assert geglu.packed_halves[0]._packed is None  # nothing was packed
    grad = x.grad.clone()
    x.grad = None
    set_packed_linear(geglu, False)
    geglu(x).square().sum().backward()
    assert torch.equal(x.grad, grad)


def test_switching_off_restores_plain_modules_and_keys() -> None:
    unet = UNetModel(TINY_UNET)
    keys = list(unet.state_dict())
    assert set_packed_linear(unet, True) > 0 and is_packed_linear(unet)
    assert list(unet.state_dict()) == keys
    set_packed_linear(unet, False)
    assert not is_packed_linear(unet)
    assert all(type(m) is nn.Linear for m in unet.modules() if isinstance(m, nn.Linear))
    assert all(m.packed_halves is None for m in unet.modules() if isinstance(m, GEGLU))


@pytest.mark.parametrize("dtype, tolerance",
                         [(torch.float32, 1e-5)] + ([(torch.bfloat16, 0.02)] if BF16 else []))
def test_prepared_unet_packed_linear_matches_plain(dtype: torch.dtype, tolerance: float) -> None:
    torch.manual_seed(5)
    unet = perturb(UNetModel(TINY_UNET), 0.05)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0])
    ctx = torch.randn(2, 7, TINY_UNET.context_dim)
    with torch.inference_mode():
        ref = unet.eval()(x, t, ctx)
    prepare_for_inference(unet, dtype, channels_last=True, packed_linear=True)
    with torch.inference_mode():
        got = unet(x.to(dtype), t, ctx.to(dtype))
    assert any(m.packed_weight._packed is not None for m in unet.modules()
               if isinstance(m, PackedLinear))
    assert rel_l2(got.float(), ref) < tolerance
    prepare_for_inference(unet, torch.float32)
    assert not is_packed_linear(unet)


def test_choose_packed_linear_measures_once_and_caches(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    unet = UNetModel(TINY_UNET)
    assert choose_packed_linear(unet, TINY_UNET, torch.float32, 8, autotune=False) is False
    assert not is_packed_linear(unet)
    choice = choose_packed_linear(unet, TINY_UNET, torch.float32, 8)
    assert is_packed_linear(unet) is choice
    cache = json.loads((tmp_path / "ldm" / "autotune.json").read_text())
    keys = [k for k in cache if k.startswith("packed_linear|")]
    assert len(keys) == 1 and cache[keys[0]] == ("on" if choice else "off")
    assert choose_packed_linear(unet, TINY_UNET, torch.float32, 8) is choice


def test_plan_key_names_convolution_packing_only(monkeypatch) -> None:
    """Packed linears alone leave the Winograd plan keyed as unpacked convolutions."""
    from ldm.inference import setup
    from conftest import tiny_pipeline
    pipe = tiny_pipeline()
    prepare = setup.prepare_for_inference
    for net in (pipe.unet, pipe.autoencoder):
        prepare(net, torch.float32, channels_last=True, prepacked=False, packed_linear=True)
    keys = []
    monkeypatch.setattr(setup, "plan_network", lambda net, call, key, *a, **k: keys.append(key))
    setup.plan_layers(pipe, 8)
    assert keys and all(key.endswith("packed False") for key in keys)

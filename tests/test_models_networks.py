"""Shapes, norms and posterior maths of the networks (tiny configs, CPU)."""
import math

import pytest
import torch

import ldm.models.layers as layers
from ldm.config import AutoencoderConfig, TextEncoderConfig, UNetConfig
from ldm.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm.models.layers import GroupNormSiLU, timestep_embedding
from ldm.models.unet import UNetModel

from conftest import TINY_UNET

TINY_VAE = AutoencoderConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=32)


def test_unet_shapes_and_learned_variance():
    torch.manual_seed(0)
    cfg = UNetConfig(**{**TINY_UNET.__dict__, "out_channels": 8})
    unet = UNetModel(cfg)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    out = unet(x, torch.tensor([0, 999]), ctx)
    assert out.shape == (2, 8, 8, 8)
    # output conv starts at zero (SD's zero_module), so the untrained net outputs zeros
    assert out.abs().max() == 0


def test_unet_uses_context_and_timestep():
    torch.manual_seed(0)
    unet = UNetModel(TINY_UNET)
    for p in unet.parameters():  # undo zero-init so every branch matters
        torch.nn.init.normal_(p, std=0.05)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16)
    base = unet(x, torch.tensor([10]), ctx)
    assert not torch.allclose(base, unet(x, torch.tensor([500]), ctx))
    assert not torch.allclose(base, unet(x, torch.tensor([10]), ctx + 1))


def test_every_group_norm_goes_through_kernel(monkeypatch):
    calls = []
    real = layers.group_norm_silu

    def spy(x, num_groups, weight, bias, eps, silu):
        calls.append((eps, silu))
        return real(x, num_groups, weight, bias, eps, silu)

    monkeypatch.setattr(layers, "group_norm_silu", spy)
    unet, vae = UNetModel(TINY_UNET), AutoencoderKL(TINY_VAE)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in [*unet.modules(), *vae.modules()])
    unet(torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 3, 16))
    unet_calls = set(calls)
    calls.clear()
    vae.decode(vae.encode(torch.randn(1, 3, 16, 16)).mode())
    assert unet_calls == {(1e-5, True), (1e-6, False)}  # ResBlocks; SpatialTransformer norm
    assert set(calls) == {(1e-6, True), (1e-6, False)}  # VAE resnets; VAE attention


def test_group_norm_silu_matches_torch():
    torch.manual_seed(0)
    m = GroupNormSiLU(64, eps=1e-6)
    torch.nn.init.normal_(m.weight)
    torch.nn.init.normal_(m.bias)
    x = torch.randn(2, 64, 5, 3)
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, m.weight, m.bias, 1e-6))
    torch.testing.assert_close(m(x), ref)
    assert set(m.state_dict()) == {"weight", "bias"}


def test_timestep_embedding_formula():
    emb = timestep_embedding(torch.tensor([0.0, 7.0]), 6)
    freqs = [math.exp(-math.log(10000) * i / 3) for i in range(3)]
    expected = [math.cos(7 * f) for f in freqs] + [math.sin(7 * f) for f in freqs]
    torch.testing.assert_close(emb[1], torch.tensor(expected))
    assert emb[0, :3].eq(1).all() and emb[0, 3:].eq(0).all()


def test_autoencoder_roundtrip_shapes():
    vae = AutoencoderKL(TINY_VAE)
    posterior = vae.encode(torch.randn(2, 3, 32, 32))
    assert posterior.mean.shape == (2, 4, 16, 16) and vae.downsampling_factor == 2
    assert vae.decode(posterior.mode()).shape == (2, 3, 32, 32)


def test_diagonal_gaussian():
    moments = torch.cat([torch.full((1, 2, 2, 2), 0.5), torch.full((1, 2, 2, 2), 50.0)], dim=1)
    post = DiagonalGaussian(moments)
    assert post.logvar.max() == 20.0  # clamped
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(post.sample(g1), post.sample(g2))
    assert DiagonalGaussian(torch.zeros(3, 8, 2, 2)).kl().abs().max() == 0  # N(0, I) vs N(0, I)
    shifted = DiagonalGaussian(torch.cat([torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)], 1))
    assert shifted.kl().item() == pytest.approx(0.5 * 16)  # 0.5 * sum(mean^2)


def test_text_encoder_frozen_by_default_and_trainable_option():
    from ldm.models.text_encoder import build_text_encoder
    arch = {"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77}
    frozen = build_text_encoder(TextEncoderConfig(kind="hf_clip", arch_config=arch, layer="last"))
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.training
    trainable = build_text_encoder(TextEncoderConfig(kind="hf_clip", arch_config=arch,
                                                     trainable=True))
    assert all(p.requires_grad for p in trainable.parameters())
    assert trainable.encode(["a cat"]).shape == (1, 77, 16)


def test_long_prompt_warns_with_dropped_count():
    from ldm.models.text_encoder import PromptTokenizer
    tok = PromptTokenizer()
    with pytest.warns(UserWarning, match="5 of its 80 tokens were dropped"):
        ids = tok([" ".join(["cat"] * 80)])
    assert ids.shape == (1, 77) and ids[0, -1] == 49407 and ids[0, 0] == 49406


def test_bfloat16_forward_close_to_float32():
    torch.manual_seed(0)
    unet = UNetModel(TINY_UNET)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16), torch.tensor([7, 900])
    ref = unet(x, t, ctx)
    out = unet.to(torch.bfloat16)(x, t, ctx)
    assert out.dtype == torch.float32  # returns the input's dtype
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_text_encoder_config_errors():
    from ldm.config import ConfigError
    from ldm.models.text_encoder import build_text_encoder
    arch = {"embed_dim": 8, "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 8,
                                         "heads": 2, "layers": 1}}
    with pytest.raises(ConfigError, match="max_length 77 exceeds the tower's context_length 16"):
        build_text_encoder(TextEncoderConfig(kind="open_clip", arch_config=arch))
    with pytest.raises(ConfigError, match="kind: 'bert'"):
        build_text_encoder(TextEncoderConfig(kind="bert"))
    with pytest.raises(ConfigError, match="layer: 'middle'"):
        build_text_encoder(TextEncoderConfig(kind="open_clip", arch_config=arch, max_length=16,
                                             layer="middle"))


def test_autoencoder_with_attention_levels():
    cfg = AutoencoderConfig(ch=32, ch_mult=[1, 2], num_res_blocks=2, attn_resolutions=[8],
                            resolution=16, z_channels=3, embed_dim=3)
    vae = AutoencoderKL(cfg)
    keys = vae.state_dict()
    assert "encoder.down.1.attn.1.q.weight" in keys and "decoder.up.1.attn.2.proj_out.weight" in keys
    assert "encoder.down.0.attn.0.q.weight" not in keys  # 16x16 level has none
    posterior = vae.encode(torch.randn(1, 3, 16, 16))
    assert posterior.mean.shape == (1, 3, 8, 8)
    assert vae.decode(posterior.sample(torch.Generator().manual_seed(0))).shape == (1, 3, 16, 16)

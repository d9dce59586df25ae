"""Training building blocks: EMA, warm-up, diffusion losses, VAE loss, atomic state, NaN stop."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm.config import DiffusionConfig
from ldm.diffusion.schedule import make_schedule
from ldm.prediction import PredictionType
from ldm.train.config import EMAConfig, OptimConfig, RunConfig, VAELossConfig
from ldm.train.diffusion_loss import LossTerms, diffusion_loss, min_snr_weight, vlb_term
from ldm.train.distributed import DistInfo
from ldm.train.ema import EMA
from ldm.train.loop import OptimGroup, Trainer, TrainingDiverged
from ldm.train.optim import lr_factor, make_optimizer
from ldm.train.state import ResumeError, find_checkpoint, save_state
from ldm.train.vae_loss import VAELoss


def test_ema_follows_litema_decay_and_swaps_back():
    net = nn.Linear(2, 1, bias=False)
    net.weight.data.fill_(0.0)
    ema = EMA(net, decay=0.9, warmup=True)
    net.weight.data.fill_(1.0)
    ema.update(net)                       # decay min(0.9, 1/10) = 0.1 -> shadow 0.9
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.9))
    with ema.swapped_in(net):
        assert torch.allclose(net.weight, torch.full((1, 2), 0.9))
    assert torch.allclose(net.weight, torch.ones(1, 2))
    state = ema.state_dict()
    other = EMA(net, 0.9)
    other.load_state_dict(state)
    assert other.num_updates == 1 and torch.equal(other.shadow["weight"], ema.shadow["weight"])


def test_warmup_then_cosine():
    c = OptimConfig(lr=1.0, warmup_steps=4, decay="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, c, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, c, 14) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(14, c, 14) == pytest.approx(0.1)
    opt, sched = make_optimizer([nn.Parameter(torch.zeros(1))], c, 14)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_perfect_prediction_has_zero_simple_loss(kind):
    terms = LossTerms.from_schedule(make_schedule(DiffusionConfig()), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    a, s = terms.at("a", t), terms.at("s", t)
    x_t = a * x0 + s * noise
    target = {"eps": noise, "v": a * noise - s * x0, "x0": x0}[kind]
    loss, logs = diffusion_loss(terms, target, x0, noise, x_t, t, kind, False, 0.0, 0.001, 1000)
    assert float(loss) < 1e-10
    wrong, _ = diffusion_loss(terms, target + 0.1, x0, noise, x_t, t, kind, False, 0.0, 0.001, 1000)
    assert float(wrong) == pytest.approx(0.01, rel=1e-4)


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 50.0])
    assert torch.allclose(min_snr_weight(snr, 5.0, PredictionType.EPS), torch.tensor([1.0, 1.0, 0.1]))
    assert torch.allclose(min_snr_weight(snr, 5.0, PredictionType.V), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    assert torch.equal(min_snr_weight(snr, 0.0, PredictionType.EPS), torch.ones(3))


def test_vlb_is_zero_for_the_true_posterior_and_positive_otherwise():
    terms = LossTerms.from_schedule(make_schedule(DiffusionConfig(beta_schedule="linear",
                                                                  linear_start=1e-4, linear_end=0.02)),
                                    torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([1, 10])
    x_t = terms.at("a", t) * x0 + terms.at("s", t) * noise
    # v = -1 selects exactly the posterior variance (improved DDPM eq. 15)
    exact = vlb_term(terms, x0, x_t, t, noise, -torch.ones_like(x0), PredictionType.EPS)
    assert torch.allclose(exact, torch.zeros(2), atol=1e-5)
    off = vlb_term(terms, x0, x_t, t, noise, torch.ones_like(x0), PredictionType.EPS)
    assert (off > 1e-4).all()
    out = torch.cat([noise, torch.zeros_like(x0)], 1).requires_grad_(True)
    loss, logs = diffusion_loss(terms, out, x0, noise, x_t, t, "eps", True, 0.0, 0.001, 1000)
    loss.backward()
    # the vb term trains only the variance channels: the mean half gets no gradient from it
    assert torch.count_nonzero(out.grad[:, :4]) == 0 and "loss_vlb" in logs


def test_vae_loss_adaptive_weight_and_discriminator():
    loss = VAELoss(VAELossConfig(disc_start=2, kl_weight=1e-6))
    last = nn.Conv2d(4, 3, 3, padding=1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = last(torch.randn(2, 4, 32, 32))

    class Post:
        def kl(self):
            return torch.ones(2)
    total, logs = loss.generator_loss(x, recon, Post(), step=1, last_layer=last.weight)
    assert "loss_g" not in logs
    total, logs = loss.generator_loss(x, recon, Post(), step=2, last_layer=last.weight)
    assert float(logs["d_weight"]) > 0 and "loss_g" in logs
    d_loss, d_logs = loss.discriminator_loss(x, recon)
    assert float(d_loss) > 0 and d_logs["logits_real"].ndim == 0


def test_state_is_atomic_and_found(tmp_path):
    with pytest.raises(ResumeError, match="does not exist"):
        find_checkpoint(tmp_path / "missing")
    with pytest.raises(ResumeError, match="no training checkpoint"):
        find_checkpoint(tmp_path)
    save_state(tmp_path, 3, {"w": torch.ones(2)}, {"step": 3}, keep=2)
    # a directory left half-written by a kill is ignored
    (tmp_path / "checkpoints" / ".tmp-step-0000006").mkdir()
    save_state(tmp_path, 5, {"w": torch.ones(2)}, {"step": 5}, keep=2)
    save_state(tmp_path, 7, {"w": torch.ones(2)}, {"step": 7}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-0000005", "step-0000007"]
    assert find_checkpoint(tmp_path).name == "step-0000007"


class _ToyTask:
    """Fits w to 1; the loss turns NaN from step `nan_from` on."""
    title, export_name = "toy", "toy.pt"

    def __init__(self, nan_from: int) -> None:
        self.net, self.nan_from = nn.Linear(1, 1), nan_from
        opt, sched = make_optimizer(self.net.parameters(), OptimConfig(lr=0.1), 100)
        self._groups = [OptimGroup("model", list(self.net.parameters()), opt, sched, 1.0)]

    def modules(self): return {"net": self.net}
    def ema_target(self): return self.net
    def groups(self): return self._groups
    def start(self, batch, ctx): pass
    def extra_state(self): return {}
    def load_extra_state(self, state): pass
    def log_images(self, directory, step, ema): pass

    def micro_step(self, batch, step, ctx):
        loss = (self.net(batch) - 1).pow(2).mean()
        if step >= self.nan_from:
            loss = loss * float("nan")
        ctx.backward(loss, self._groups[0].params)
        return {"loss": loss.detach()}

    def export(self, path: Path, ema):
        torch.save({"w": self.net.weight.detach().clone()}, path)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    task = _ToyTask(nan_from=5)
    run = RunConfig(steps=10, batch_size=2, checkpoint_every=2, log_every=1, image_every=0, progress=False)

    def batches_from(position):
        while True:
            yield torch.ones(2, 1)
    trainer = Trainer(task, run, EMAConfig(decay=0.5), DistInfo(), tmp_path, {}, batches_from)
    with pytest.raises(TrainingDiverged, match="NaN/inf at step 6"):
        trainer.fit()
    assert find_checkpoint(tmp_path).name == "step-0000004"
    saved = torch.load(tmp_path / "toy.pt", weights_only=True)["w"]
    assert torch.isfinite(saved).all()
    assert math.isfinite(trainer.metrics.rows[3]["loss"])


def test_lpips_from_local_files(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    from ldm.train.lpips import LPIPS, LPIPSUnavailable
    with pytest.raises(LPIPSUnavailable, match="not downloaded"):
        LPIPS(str(tmp_path / "vgg16.pth"), str(tmp_path / "lin.pth"))
    torch.manual_seed(0)
    trunk = make_layers(cfgs["D"])  # random stand-ins with the real files' key layout
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, tmp_path / "vgg16.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
                for i, c in enumerate((64, 128, 256, 512, 512))}, tmp_path / "lin.pth")
    lpips = LPIPS(str(tmp_path / "vgg16.pth"), str(tmp_path / "lin.pth"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(lpips(x, x), torch.zeros(2, 1, 1, 1))
    assert (lpips(x, x.flip(-1)) > 0).all()
    assert not any(p.requires_grad for p in lpips.parameters())


def test_resume_with_a_different_model_is_a_clear_error(tmp_path):
    run = RunConfig(steps=2, batch_size=2, checkpoint_every=2, log_every=1, image_every=0, progress=False)

    def batches_from(position):
        while True:
            yield torch.ones(2, 1)
    Trainer(_ToyTask(nan_from=99), run, EMAConfig(), DistInfo(), tmp_path, {}, batches_from).fit()
    other = _ToyTask(nan_from=99)
    other.net = nn.Linear(1, 2)  # a different model
    with pytest.raises(ResumeError, match="does not fit this run's config .*size mismatch"):
        Trainer(other, run, EMAConfig(), DistInfo(), tmp_path, {}, batches_from, resume=str(tmp_path))


@pytest.mark.parametrize("size", [8, 7])
def test_gradient_checkpointing_keeps_gradients(size: int):
    # The U-Net's blocks as LDMTask wraps them; an odd side also sends the upsample's
    # target size through the checkpointed call.
    from ldm.config import UNetConfig
    from ldm.models.unet import TimestepSequential, UNetModel
    from ldm.train.grad_checkpoint import enable_gradient_checkpointing
    config = UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                        attention_resolutions=[1], num_heads=2, context_dim=32)
    torch.manual_seed(0)
    plain = UNetModel(config)
    for p in plain.parameters():  # zero-initialised output convs would leave most grads zero
        nn.init.normal_(p, std=0.05)
    wrapped = UNetModel(config)
    wrapped.load_state_dict(plain.state_dict())
    assert enable_gradient_checkpointing(wrapped, (TimestepSequential,)) > 0
    x, t, ctx = torch.randn(2, 4, size, size), torch.tensor([1, 500]), torch.randn(2, 8, 32)
    for net in (plain, wrapped):
        net(x, t, ctx).square().mean().backward()
    assert plain.input_blocks[0][0].weight.grad.abs().max() > 0
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_model_config_without_training_switches_and_old_flag_loads():
    # Configs stored in existing checkpoints (the shipped one too) may hold
    # unet.gradient_checkpointing: they load, the key dropped.
    from safetensors import safe_open

    from ldm import checkpoint as ckpt
    from ldm.config import ModelConfig, UNetConfig, from_dict, to_dict
    assert "gradient_checkpointing" not in to_dict(ModelConfig())["unet"]
    old = from_dict(ModelConfig, {"unet": {"gradient_checkpointing": True, "model_channels": 64}})
    assert old.unet == UNetConfig(model_channels=64)
    asset = Path(__file__).resolve().parents[1] / "ldm" / "assets" / "shapes.safetensors"
    with safe_open(str(asset), "pt") as f:
        metadata = f.metadata()
    assert ckpt.config_from_metadata(metadata).unet.channel_mult == [1, 2, 2]

"""Samplers without a network: on Gaussian data the exact denoiser is known in closed form.

For x0 ~ N(mu, var) per channel and x_t = a x0 + s eps, E[x0 | x_t] = mu + a var (x_t - a mu) /
(a^2 var + s^2). Each sampler must turn noise into samples with the data's mean and variance;
deterministic ones must follow the exact probability-flow map; stochastic ones must reproduce
plain-formula references (SD / k-diffusion) given the same injected noise.
"""
import math

import pytest
import torch

from ldm.config import DiffusionConfig
from ldm.diffusion import samplers as samplers_module
from ldm.diffusion.coefficients import (ddim_coefficients, ddpm_coefficients,
                                        dpmpp_2m_coefficients, euler_coefficients,
                                        plms_coefficients)
from ldm.diffusion.denoiser import Denoiser
from ldm.prediction import from_x0_eps
from ldm.diffusion.schedule import make_schedule
from ldm.diffusion.samplers import SAMPLERS, get_sampler, invert_ddim, sample
from ldm.diffusion.timesteps import sampling_sigmas, spaced_timesteps, t_to_sigma
from ldm.kernels.sampler_step import sampler_step, sampler_step_reference
from ldm.prediction import PredictionType

# DDPM's linear schedule: terminal SNR ~4e-5, so starting from N(0, I) biases means by < 1%.
SCHEDULE = make_schedule(DiffusionConfig(beta_schedule="linear", linear_start=1e-4, linear_end=0.02))
MU = torch.tensor([0.5, -1.0, 0.0, 1.0]).view(1, 4, 1, 1)
VAR = torch.tensor([0.25, 1.0, 0.5, 2.0]).view(1, 4, 1, 1)
DETERMINISTIC = ["ddim", "plms", "dpmpp_2m", "dpmpp_2m_karras", "euler"]
STOCHASTIC = ["ddpm", "euler_a"]


def vp_scales(schedule, t):
    """(a, s) [B,1,1,1] float32 at (fractional) timesteps t via the interpolated sigma."""
    sigma = t_to_sigma(schedule, t).view(-1, 1, 1, 1)
    a = torch.rsqrt(1 + sigma ** 2)
    return a.float(), (a * sigma).float()


def gaussian_denoiser(prediction_type=PredictionType.EPS, schedule=SCHEDULE, learned_var=None):
    """Exact denoiser of N(MU, VAR) data, outputting in `prediction_type`."""
    def model(x, t):
        a, s = vp_scales(schedule, t)
        x0 = MU + a * VAR / (a * a * VAR + s * s) * (x - a * MU)
        eps = (x - a * x0) / s
        out = from_x0_eps(x0, eps, a, s, prediction_type)
        if learned_var is not None:
            out = torch.cat([out, torch.full_like(out, learned_var)], dim=1)
        return out
    return Denoiser(model, prediction_type, learned_variance=learned_var is not None)


def start_noise(n=256, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", DETERMINISTIC + STOCHASTIC)
def test_gaussian_data_distribution(name):
    x = start_noise()
    steps = 100 if name in DETERMINISTIC else 250  # ancestral plug-in variance loss is O(1/steps)
    out = sample(name, gaussian_denoiser(PredictionType.V), x, SCHEDULE, steps,
                 generator=torch.Generator().manual_seed(1))
    n = out.numel() // 4
    mean, var = out.mean((0, 2, 3)), out.var((0, 2, 3))
    # 5 standard errors of the sample statistics, plus the terminal-SNR bias / discretisation.
    mean_tol = 5 * (VAR.flatten() / n).sqrt() + 0.02
    var_tol = 5 * math.sqrt(2 / n) + 0.06
    assert ((mean - MU.flatten()).abs() <= mean_tol).all(), (mean, MU.flatten())
    assert ((var / VAR.flatten() - 1).abs() <= var_tol).all(), (var, VAR.flatten())


def _first_scales(name, steps):
    """(x scale, a, s) of the first state of sampler `name`."""
    if name in ("ddim", "plms"):
        abar = SCHEDULE.alphas_cumprod[spaced_timesteps(1000, steps)[0]]
        return 1.0, abar.sqrt().item(), (1 - abar).sqrt().item()
    _, sigmas = sampling_sigmas(SCHEDULE, steps, karras=name.endswith("karras"))
    a = 1 / math.sqrt(1 + sigmas[0].item() ** 2)
    return a * sigmas[0].item(), a, a * sigmas[0].item()


ORDER = {"ddim": 1, "euler": 1, "plms": 2, "dpmpp_2m": 2, "dpmpp_2m_karras": 2}


def _flow_error(name, prediction_type, steps):
    """Max distance of the sampler's output from the exact probability-flow map."""
    # For Gaussian data the ODE maps standardised x_t to standardised x0.
    x = start_noise(16)
    scale, a, s = _first_scales(name, steps)
    exact = MU + VAR.sqrt() * (scale * x - a * MU) / (a * a * VAR + s * s).sqrt()
    out = sample(name, gaussian_denoiser(prediction_type), x, SCHEDULE, steps)
    return (out - exact).abs().max().item()


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("prediction_type", [PredictionType.EPS, PredictionType.V, PredictionType.X0])
def test_deterministic_samplers_converge_to_exact_flow(name, prediction_type):
    coarse, fine = _flow_error(name, prediction_type, 15), _flow_error(name, prediction_type, 60)
    assert fine < 0.2, fine
    # 4x the steps must cut the error by about 4^order (first order: DDIM, Euler).
    assert coarse / fine > 0.6 * 4 ** ORDER[name], (coarse, fine)


def test_ddim_eta0_deterministic_and_invertible():
    x_T = start_noise(8)
    denoiser = gaussian_denoiser(PredictionType.EPS)
    first = sample("ddim", denoiser, x_T, SCHEDULE, 50, eta=0.0)
    assert torch.equal(first, sample("ddim", denoiser, x_T, SCHEDULE, 50, eta=0.0))
    errors = []
    for steps in (20, 200):
        x0 = sample("ddim", denoiser, x_T, SCHEDULE, steps)
        errors.append((invert_ddim(denoiser, x0, SCHEDULE, steps) - x_T).abs().max().item())
    assert errors[1] < 0.15 and errors[1] < errors[0] / 5, errors  # first order: ~10x better


def _ve_reference(name, denoiser, x, steps, noise):
    """Plain k-diffusion loops in VE space (x_ve = x / a, network input c_in x_ve)."""
    t, sigmas = sampling_sigmas(SCHEDULE, steps)
    x = x * sigmas[0].item()
    old = None
    for i in range(steps):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        a = 1 / math.sqrt(1 + sigma ** 2)
        out = denoiser(x * a, t[i].float().expand(x.shape[0]))
        x0 = (x * a - a * sigma * out) / a if denoiser.prediction_type == PredictionType.EPS else None
        if name == "euler_a":
            up = min(sigma_next, math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
            down = math.sqrt(sigma_next ** 2 - up ** 2)
            x = x + (x - x0) / sigma * (down - sigma) + up * noise[i]
        else:  # dpmpp_2m
            h = math.log(sigma / sigma_next) if sigma_next > 0 else math.inf
            d = x0
            if old is not None and sigma_next > 0:
                h_last = math.log(sigmas[i - 1].item() / sigma)
                r = h_last / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old
            x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * d
            old = x0
    return x


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m"])
def test_sigma_samplers_match_kdiffusion_formulas(name):
    x = start_noise(4)
    steps = 12
    noise = torch.randn(steps, *x.shape, generator=torch.Generator().manual_seed(3))
    denoiser = gaussian_denoiser(PredictionType.EPS)
    ours = sample(name, denoiser, x, SCHEDULE, steps, noise=noise)
    ref = _ve_reference(name, denoiser, x, steps, noise)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_ddim_eta1_and_ddpm_match_sd_formulas():
    x = start_noise(4)
    steps = 10
    noise = torch.randn(steps, *x.shape, generator=torch.Generator().manual_seed(4))
    denoiser = gaussian_denoiser(PredictionType.EPS)
    ts = spaced_timesteps(1000, steps)
    abar = SCHEDULE.alphas_cumprod
    ddim, ddpm = x.clone(), x.clone()
    for i, t in enumerate(ts.tolist()):
        prev_t = ts[i + 1].item() if i + 1 < steps else None
        # SD DDIMSampler.p_sample_ddim (eta = 1); last alpha_prev = alphas_cumprod[0].
        at, ap = abar[t].item(), abar[prev_t if prev_t is not None else 0].item()
        e = denoiser(ddim, torch.full((4,), t))
        x0 = (ddim - math.sqrt(1 - at) * e) / math.sqrt(at)
        sig = math.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
        ddim = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sig ** 2) * e + sig * noise[i]
        # DDPM posterior q(x_prev | x_t, x0) on the respaced chain, fixed small variance.
        ap = abar[prev_t].item() if prev_t is not None else 1.0
        beta = 1 - at / ap
        e = denoiser(ddpm, torch.full((4,), t))
        x0 = (ddpm - math.sqrt(1 - at) * e) / math.sqrt(at)
        mean = (beta * math.sqrt(ap) * x0 + (1 - ap) * math.sqrt(1 - beta) * ddpm) / (1 - at)
        ddpm = mean + math.sqrt(beta * (1 - ap) / (1 - at)) * noise[i]
    for name, ref in (("ddim", ddim), ("ddpm", ddpm)):
        ours = sample(name, denoiser, x, SCHEDULE, steps, noise=noise,
                      eta=1.0 if name == "ddim" else None)
        assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max(), name


def test_ddpm_learned_variance_spans_fixed_small_to_large():
    x = start_noise(4)
    noise = torch.randn(20, *x.shape, generator=torch.Generator().manual_seed(5))
    run = lambda d, v: sample("ddpm", d, x, SCHEDULE, 20, noise=noise) if v is None else \
        samplers_module.sample_ddpm(d, x, SCHEDULE, 20, variance=v, noise=noise)  # noqa: E731
    plain = gaussian_denoiser()
    for value, variance in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        learned = run(gaussian_denoiser(learned_var=value), None)
        assert torch.allclose(learned, run(plain, variance), atol=1e-5, rtol=1e-5), variance
    assert not torch.allclose(run(plain, "fixed_small"), run(plain, "fixed_large"))


def test_zero_terminal_snr_v_prediction_trailing():
    # With abar_T = 0 the start N(0, I) is exact at t = T - 1, so no terminal bias remains.
    schedule = make_schedule(DiffusionConfig(beta_schedule="linear", linear_start=1e-4,
                                             linear_end=0.02, zero_terminal_snr=True))
    x = start_noise(16)
    out = samplers_module.sample_ddim(gaussian_denoiser(PredictionType.V, schedule), x, schedule, 100,
                                      spacing="trailing")
    assert torch.isfinite(out).all()
    exact = MU + VAR.sqrt() * x
    assert (out - exact).abs().max() < 0.1
    with pytest.raises(ValueError, match="zero terminal SNR"):  # eps cannot denoise at abar = 0
        samplers_module.sample_ddim(gaussian_denoiser(PredictionType.EPS, schedule), x, schedule, 10,
                                    spacing="trailing")


def _sampler_rows():
    ts = spaced_timesteps(1000, 6)
    _, sigmas = sampling_sigmas(SCHEDULE, 6)
    return {"ddim": ddim_coefficients(SCHEDULE, ts, 0.7, 3.0),
            "ddpm": ddpm_coefficients(SCHEDULE, ts, "learned", 3.0),
            "plms": plms_coefficients(SCHEDULE, ts, 3.0)[0],
            "dpmpp_2m": dpmpp_2m_coefficients(sigmas, 3.0),
            "euler_a": euler_coefficients(sigmas, 1.0, 3.0)}


@pytest.mark.parametrize("name", ["ddim", "ddpm", "plms", "dpmpp_2m", "euler_a"])
@pytest.mark.parametrize("kind", list(PredictionType))
def test_fused_and_reference_update_agree(name, kind):
    g = torch.Generator().manual_seed(6)
    learned = name == "ddpm"
    x = torch.randn(2, 4, 5, 7, generator=g)
    out = torch.randn(4, 8 if learned else 4, 5, 7, generator=g)  # [uncond; cond]
    prev, noise = torch.randn(2, 4, 5, 7, generator=g), torch.randn(2, 4, 5, 7, generator=g)
    for row in _sampler_rows()[name]:
        fused = sampler_step(x, out, row, noise, prev, kind, learned)
        ref = sampler_step_reference(x, out, row, noise, prev, kind, learned)
        for f, r in zip(fused, ref):
            assert torch.allclose(f, r, rtol=1e-5, atol=1e-5)


def test_every_step_goes_through_the_fused_update(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[2].shape)
        return sampler_step(*args, **kwargs)
    monkeypatch.setattr(samplers_module, "sampler_step", counting)
    seen = []
    for name in SAMPLERS:
        calls.clear()
        seen.clear()
        sample(name, gaussian_denoiser(), start_noise(2), SCHEDULE, 5,
               generator=torch.Generator().manual_seed(0),
               callback=lambda i, x, d: seen.append((i, x.shape, d.shape)))
        extra = 1 if name == "plms" else 0  # PLMS's first step is predictor + corrector
        assert len(calls) == 5 + extra and all(c == (10,) for c in calls), name
        assert [i for i, _, _ in seen] == list(range(5)), name


def test_registry_and_argument_errors():
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*ddim"):
        get_sampler("heun")
    with pytest.raises(ValueError, match="deterministic"):
        sample("plms", gaussian_denoiser(), start_noise(2), SCHEDULE, 5, eta=0.5)
    with pytest.raises(ValueError, match="steps must be"):
        sample("ddim", gaussian_denoiser(), start_noise(2), SCHEDULE, 1001)
    with pytest.raises(ValueError, match="Generator"):
        sample("ddim", gaussian_denoiser(), start_noise(2), SCHEDULE, 5, eta=1.0)
    with pytest.raises(ValueError, match="noise must have shape"):
        sample("ddpm", gaussian_denoiser(), start_noise(2), SCHEDULE, 5, noise=torch.zeros(4, 2, 4, 8, 8))


@pytest.mark.parametrize("kind", list(PredictionType))
def test_parameterisation_round_trip_matches_fused_step(kind):
    from ldm.prediction import to_x0_eps
    from ldm.kernels.sampler_step import step_coefficients
    g = torch.Generator().manual_seed(7)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    a, s = 0.6, 0.8
    x = a * x0 + s * eps
    target = from_x0_eps(x0, eps, a, s, kind)
    back_x0, back_eps = to_x0_eps(x, target, a, s, kind)
    assert torch.allclose(back_x0, x0, atol=1e-5) and torch.allclose(back_eps, eps, atol=1e-5)
    _, denoised = sampler_step_reference(x, target, step_coefficients(a=a, s=s), prediction_type=kind)
    assert torch.allclose(denoised, x0, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 7, 8, 12, 15, 30, 50, 999])
def test_uniform_spacing_is_sd_make_ddim_timesteps(steps):
    import numpy as np
    reference = np.asarray(list(range(0, 1000, 1000 // steps))) + 1  # util.make_ddim_timesteps
    if reference[-1] >= 1000:  # T // S = 1: the reference would index past alphas_cumprod
        reference = reference - 1
    ours = spaced_timesteps(1000, steps)
    assert ours.flip(0).tolist() == reference.tolist()
    assert len(spaced_timesteps(1000, steps, "leading")) == steps


def test_visited_timesteps_count_every_callback():
    from ldm.diffusion.samplers import visited_timesteps
    assert len(spaced_timesteps(1000, 12)) == 13 and len(spaced_timesteps(1000, 30)) == 31
    for name in SAMPLERS:
        seen = []
        sample(name, gaussian_denoiser(), start_noise(2), SCHEDULE, 12,
               generator=torch.Generator().manual_seed(0), callback=lambda i, x, d: seen.append(i))
        expected = 12 if name in samplers_module.SIGMA_SAMPLERS else 13
        assert len(visited_timesteps(name, SCHEDULE, 12)) == len(seen) == expected, name


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "euler_a"])
def test_start_runs_the_tail_of_the_same_plan(name):
    """History-free samplers: the plan from index k on, started at the latent the whole run
    had there, ends where the whole run ends (same per-step noise)."""
    x = start_noise(4)
    n = len(samplers_module.visited_timesteps(name, SCHEDULE, 10))
    noise = torch.randn(n, *x.shape, generator=torch.Generator().manual_seed(2))
    xs = []
    whole = sample(name, gaussian_denoiser(), x, SCHEDULE, 10, noise=noise,
                   callback=lambda i, x_, d: xs.append(x_))
    tail = sample(name, gaussian_denoiser(), xs[3], SCHEDULE, 10, start=4, noise=noise[4:])
    assert torch.allclose(tail, whole, atol=1e-5)
    with pytest.raises(ValueError, match="start must be"):
        sample(name, gaussian_denoiser(), x, SCHEDULE, 10, start=n)


def test_encode_level_follows_sd_img2img_for_timestep_samplers():
    from ldm.diffusion.samplers import encode_level, step_levels
    a, s = step_levels("ddim", SCHEDULE, 8)
    # stochastic_encode noises to ddim_alphas[t_enc]; decode's first step is one lower.
    assert encode_level("ddim", SCHEDULE, 8, 2) == (a[1].item(), s[1].item())
    assert encode_level("ddim", SCHEDULE, 8, 0) == (a[0].item(), s[0].item())
    a, s = step_levels("euler", SCHEDULE, 8)
    assert encode_level("euler", SCHEDULE, 8, 2) == (a[2].item(), s[2].item())
    assert (a[-1].item(), s[-1].item()) == (1.0, 0.0)
    assert torch.allclose(a ** 2 + s ** 2, torch.ones_like(a), atol=1e-12)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_edits_gaussian_data_from_a_later_start(name):
    """img2img on N(MU, VAR) data: data noised to the start level, the tail run, still data."""
    from ldm.diffusion.samplers import encode_level
    g = torch.Generator().manual_seed(8)
    x0 = MU + VAR.sqrt() * torch.randn(256, 4, 8, 8, generator=g)
    steps = 100 if name in DETERMINISTIC else 250
    n = len(samplers_module.visited_timesteps(name, SCHEDULE, steps))
    start = n - steps // 2
    a, s = encode_level(name, SCHEDULE, steps, start)
    x = a * x0 + s * torch.randn(x0.shape, generator=g)
    calls = []
    out = sample(name, gaussian_denoiser(PredictionType.V), x, SCHEDULE, steps, start=start,
                 generator=g, hook=lambda i, x_: (calls.append(i), x_)[1])
    assert calls == list(range(n - start + 1))  # before each step and on the final latent
    mean, var = out.mean((0, 2, 3)), out.var((0, 2, 3))
    assert ((mean - MU.flatten()).abs() <= 0.05).all(), (mean, MU.flatten())
    assert ((var / VAR.flatten() - 1).abs() <= 0.12).all(), (var, VAR.flatten())

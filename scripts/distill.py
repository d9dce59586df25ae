"""Progressive distillation (Salimans & Ho 2022) of a shapes text-to-image model.

Renders shapes images, encodes them once with the model's VAE and their captions with its
text encoder, then runs ldm.train.distill: each round halves the DDIM steps (teacher 64 ->
student 32 -> ... -> 4), the first teacher guided at a fixed classifier-free guidance scale
(Meng et al. 2023), so the students need no unconditional pass. After every round the student
is written as a full checkpoint, out/student-<N>steps.safetensors, whose config makes txt2img
sample it as trained (v-prediction, the trailing timestep grid, the guidance distilled in):
`scripts/txt2img.py --ckpt out/student-4steps.safetensors --steps 4`.

    python scripts/distill.py --out runs/distill --iterations 2000
    python scripts/distill.py --out runs/distill --resume runs/distill      (continue exactly)
    python scripts/distill.py --out runs/distill --export runs/distill/checkpoints/step-0001000
        (the student of an unfinished round, as out/student-<N>steps-step<S>.safetensors)
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "ldm" / "assets" / "shapes.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(DEFAULT_MODEL), help="teacher checkpoint (default: the shipped model)")
    p.add_argument("--out", default="runs/distill", help="run folder (checkpoints, students)")
    p.add_argument("--resume", default=None, help="a run folder or checkpoint directory to continue")
    p.add_argument("--teacher-steps", type=int, default=64, help="first teacher's DDIM steps (default 64)")
    p.add_argument("--final-steps", type=int, default=4, help="last student's steps (default 4)")
    p.add_argument("--iterations", type=int, default=1000, help="optimizer steps per round (default 1000)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--lr-decay", default="linear", choices=("linear", "constant"),
                   help="learning rate within a round: linear to 0 (default) or constant")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance distilled into the students (default 7.5, as "
                        "txt2img; 1 for a teacher that is itself a student and carries its guidance)")
    p.add_argument("--images", type=int, default=4000, help="rendered training images (default 4000)")
    p.add_argument("--seed", type=int, default=0, help="seed of data and training (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=250, help="default 250 steps")
    p.add_argument("--log-every", type=int, default=50, help="default 50 steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--export", default=None, metavar="CHECKPOINT_DIR",
                   help="write the student of this training checkpoint (e.g. of a round stopped "
                        "early) and exit; --ckpt must be the run's teacher")
    return p.parse_args(argv)


def encode_data(pipe, count: int, seed: int, batch: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled latents [N,C,h,w] (posterior means), contexts [N,L,D]) of rendered shapes images."""
    from ldm.data.shapes import ShapesDataset
    dataset = ShapesDataset(count, seed=seed, size=pipe.config.autoencoder.resolution)
    latents, contexts = [], []
    with torch.inference_mode():
        for start in range(0, count, batch):
            items = [dataset[i] for i in range(start, min(count, start + batch))]
            mean, _ = pipe.encode_image(torch.stack([it["image"] for it in items]))
            latents.append(mean.float() * pipe.config.diffusion.scale_factor)
            contexts.append(pipe.encode_prompt([it["caption"] for it in items]).float())
    return torch.cat(latents).clone(), torch.cat(contexts).clone()


def exporter(pipe, out: Path, guidance_scale: float, suffix: str = ""):
    """on_round_end: the student as a full checkpoint beside the run, its config saying how to
    sample it: v-prediction, the trailing timestep grid it was trained on, the guidance scale
    distilled into it (txt2img then runs one conditional pass per step)."""
    from ldm.pipeline import Pipeline

    def export(steps: int, student: torch.nn.Module) -> None:
        config = copy.deepcopy(pipe.config)
        config.diffusion.prediction_type = "v"
        config.diffusion.timestep_spacing = "trailing"
        # A teacher that is itself a student hands on the guidance it carries.
        config.diffusion.distilled_guidance = (pipe.config.diffusion.distilled_guidance
                                               or (guidance_scale if guidance_scale != 1 else 0.0))
        path = out / f"student-{steps}steps{suffix}.safetensors"
        Pipeline(pipe.autoencoder, copy.deepcopy(student).eval(), pipe.text_encoder, config).save(path)
        print(f"wrote {path}", flush=True)
    return export


def export_checkpoint(args: argparse.Namespace) -> None:
    """The student of a training checkpoint, for the steps of the round it was in."""
    import ldm
    from ldm.train.distill import DistillConfig
    from ldm.train.state import load_state
    directory = Path(args.export)
    weights, trainer = load_state(directory)
    config = DistillConfig(**trainer["distill_config"])
    step = int(trainer["step"])
    rounds = config.student_steps()
    steps = rounds[min(max(step - 1, 0) // config.iterations, len(rounds) - 1)]
    pipe = ldm.load_pipeline(args.ckpt, device="cpu", dtype="fp32", prepare=False)
    student = {k.removeprefix("student."): v for k, v in weights.items() if k.startswith("student.")}
    try:
        pipe.unet.load_state_dict(student, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{directory} does not fit {args.ckpt} ({str(err)[:200]})") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exporter(pipe, out, config.guidance_scale, suffix=f"-step{step}")(steps, pipe.unet)


def run(args: argparse.Namespace) -> None:
    """Load, encode, distil."""
    import ldm
    from ldm.prediction import parse_prediction_type
    from ldm.train.distill import DistillConfig, Distiller
    if not Path(args.ckpt).is_file():
        raise ValueError(f"checkpoint not found: {args.ckpt}")
    pipe = ldm.load_pipeline(args.ckpt, device="cpu", dtype="fp32", prepare=False)
    carried = pipe.config.diffusion.distilled_guidance
    if carried and args.guidance_scale not in (None, 1.0):
        raise ValueError(f"{args.ckpt} already carries guidance {carried:g}; distil it with "
                         "--guidance-scale 1")
    scale = args.guidance_scale if args.guidance_scale is not None else (1.0 if carried else 7.5)
    config = DistillConfig(teacher_steps=args.teacher_steps, final_steps=args.final_steps,
                           iterations=args.iterations, batch_size=args.batch, lr=args.lr,
                           lr_decay=args.lr_decay, guidance_scale=scale, seed=args.seed,
                           checkpoint_every=args.checkpoint_every)
    if pipe.config.diffusion.learned_variance:
        raise ValueError("distillation needs a teacher without learned variance")
    t0 = time.perf_counter()
    latents, contexts = encode_data(pipe, args.images, args.seed)
    with torch.inference_mode():
        uncond = pipe.encode_prompt([""]).float().clone()
    print(f"encoded {args.images} images in {time.perf_counter() - t0:.0f} s", flush=True)

    def data(generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(0, latents.shape[0], (batch,), generator=generator)
        return latents[rows], contexts[rows]

    out = Path(args.out)
    distiller = Distiller(pipe.unet, pipe.schedule, parse_prediction_type(pipe.config.diffusion.prediction_type),
                          uncond, data, config, out, resume=args.resume,
                          on_round_end=exporter(pipe, out, scale))
    held = latents[:64], contexts[:64]
    window: list[float] = []
    start = time.perf_counter()

    def report(step: int, loss: float) -> None:
        window.append(loss)
        if step % args.log_every == 0 or step == distiller.total:
            round_index = (step - 1) // config.iterations
            error = distiller.one_step_error(*held, round_index, seed=args.seed + 1)
            print(f"step {step}/{distiller.total} (round {round_index}: "
                  f"{2 * distiller.rounds[round_index]} -> {distiller.rounds[round_index]} steps): "
                  f"loss {sum(window) / len(window):.4f}, held-out 1-step error {error:.5f}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            window.clear()

    if distiller.step < distiller.total:
        first = distiller.step // config.iterations
        print(f"held-out 1-step error at step {distiller.step}: "
              f"{distiller.one_step_error(*held, first, seed=args.seed + 1):.5f}", flush=True)
    distiller.fit(report=report)


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input -> one line on stderr, exit status 2."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldm.errors import LdmError
    try:
        export_checkpoint(args) if args.export else run(args)
    except (LdmError, ValueError, OSError, FloatingPointError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The DDIM paper's Table 1 (Song et al. 2021) on the default shapes model.

Rows eta in {0, 0.2, 0.5, 1}, columns S in {10, 20, 50, 100} DDIM steps: shapes-FID of N
generated images against held-out real shapes images, plus the shapes judge's all-three
accuracy. Every cell uses the same prompts and seeds, so cells differ only by (S, eta).
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ldm.data.shapes import HELD_OUT_TRIPLES, ShapesDataset, caption, render
from ldm.data.shapes_classifier import classify
from ldm.eval.frechet import frechet_distance_from_features
from ldm.eval.generate import generate, save_images
from ldm.eval.kid import kernel_inception_distance
from ldm.eval.metrics import Extractor, extract

STEPS = (10, 20, 50, 100)
ETAS = (0.0, 0.2, 0.5, 1.0)
# The default model trains on seed 0 (full images) and seed 1 (autoencoder crops); the shapes
# feature network on seeds 2 and 1002. Real images for the table come from an unused seed.
REAL_SEED = 7000
FLOOR_SEED = 8000  # seeds 8000.. give the real-against-real draws that show the noise floor
# Paper Table 1, CIFAR-10 FID (eta = 0 is DDIM, eta = 1 its DDPM-like end), for reference.
PAPER_CIFAR10 = {0.0: (13.36, 6.84, 4.67, 4.16), 1.0: (41.07, 18.36, 8.01, 5.78)}


def real_set(num: int, size: int = 64) -> tuple[list[np.ndarray], list[tuple[str, str, str]]]:
    """Held-out real images and their triples, drawn as the default model's training set is."""
    dataset = ShapesDataset(num, seed=REAL_SEED, size=size, exclude=HELD_OUT_TRIPLES)
    specs = [dataset.spec(i)[0] for i in range(num)]
    return [render(spec, size) for spec in specs], [spec.triple for spec in specs]


def real_floor(extractor: Extractor, real_feats: np.ndarray, num: int, draws: int = 10) -> tuple[float, float]:
    """Mean and std of the FID of `num` other real images against the real set: the table's noise floor."""
    values = []
    for draw in range(draws):
        dataset = ShapesDataset(num, seed=FLOOR_SEED + draw, exclude=HELD_OUT_TRIPLES)
        feats, _ = extract(extractor, [render(dataset.spec(i)[0], 64) for i in range(num)])
        values.append(frechet_distance_from_features(real_feats, feats))
    return float(np.mean(values)), float(np.std(values))


def judge_accuracy(images: list[np.ndarray], triples: list[tuple[str, str, str]]) -> float:
    """Percent of images whose colour, shape and background the pixel judge reads as prompted."""
    return 100.0 * float(np.mean([classify(im).triple == t for im, t in zip(images, triples)]))


def cell_images(pipe, options, prompts: list[str], eta: float, steps: int, batch: int,
                folder: Path | None, model_id: str = "") -> tuple[list[np.ndarray], float]:
    """One cell's images and generation seconds; a finished cell saved in `folder` is reused."""
    from ldm.eval.images import list_images, read_images

    marker = folder / "cell.json" if folder is not None else None
    expected = {"eta": eta, "steps": steps, "prompts": prompts, "guidance_scale": options.guidance_scale,
                "model": model_id}
    if marker is not None and marker.is_file():
        saved = json.loads(marker.read_text())
        if {k: saved.get(k) for k in expected} == expected:
            return read_images(list_images(folder, "cell")), saved["seconds"]
    start = time.perf_counter()
    cell_options = dataclasses.replace(options, sampler="ddim", steps=steps, eta=eta)
    images = generate(pipe, cell_options, prompts, seed=0, batch=batch)
    seconds = time.perf_counter() - start
    if marker is not None:
        save_images(images, prompts, folder)
        marker.write_text(json.dumps(expected | {"seconds": seconds}))  # written last: the cell is complete
    return images, seconds


def run_table(pipe, options, make_extractor: Callable[[], Extractor], num_fake: int, num_real: int,
              batch: int = 32, steps: tuple[int, ...] = STEPS, etas: tuple[float, ...] = ETAS,
              log: Callable[[str], None] = print, save_dir: str | Path | None = None,
              model_id: str = "") -> dict:
    """Every (eta, S) cell: shapes-FID, shapes-KID, judge accuracy, seconds.

    All cells are generated first (and saved in save_dir/eta<eta>_S<S>, reused by a rerun), then
    scored with the feature network `make_extractor()` returns. `model_id` names the checkpoint,
    so saved cells of another model are not reused.
    """
    real_images, real_triples = real_set(num_real)
    triples = real_triples[:num_fake] if num_fake <= num_real else real_set(num_fake)[1]
    prompts = [caption(t) for t in triples]
    generated = {}
    for s in steps:  # few steps first: a run stopped early still has the paper's left columns
        for eta in etas:
            folder = Path(save_dir) / f"eta{eta:g}_S{s}" if save_dir is not None else None
            generated[eta, s] = cell_images(pipe, options, prompts, eta, s, batch, folder, model_id)
            log(f"eta {eta:<4g} S {s:<4d} generated in {generated[eta, s][1]:.0f}s")
    extractor = make_extractor()
    real_feats, _ = extract(extractor, real_images)
    cells = []
    for (eta, s), (images, seconds) in generated.items():
        feats, _ = extract(extractor, images)
        kid, kid_se = kernel_inception_distance(real_feats, feats, 100, 1000)
        cell = {"eta": eta, "steps": s, "fid": frechet_distance_from_features(real_feats, feats),
                "kid": kid, "kid_stderr": kid_se, "judge_all": judge_accuracy(images, triples),
                "seconds": seconds}
        cells.append(cell)
        log(f"eta {eta:<4g} S {s:<4d} {extractor.metric_prefix}FID {cell['fid']:8.3f}  "
            f"{extractor.metric_prefix}KID {kid:.4f} ± {kid_se:.4f}  judge {cell['judge_all']:5.1f}%")
    floor, floor_std = real_floor(extractor, real_feats, num_fake)
    log(f"noise floor: {num_fake} other real images score {extractor.metric_prefix}FID {floor:.3f} ± {floor_std:.3f}")
    return {"cells": cells, "real_floor_fid": floor, "real_floor_fid_std": floor_std,
            "steps": list(steps), "etas": list(etas), "num_fake": num_fake,
            "num_real": num_real, "real_seed": REAL_SEED, "guidance_scale": options.guidance_scale,
            "features": extractor.name, "generation_seconds": sum(c["seconds"] for c in cells)}


def cell(result: dict, eta: float, s: int) -> dict:
    """The cell of (eta, S)."""
    return next(c for c in result["cells"] if c["eta"] == eta and c["steps"] == s)


def markdown(result: dict) -> str:
    """Markdown tables of FID, KID and judge accuracy (rows eta, columns S, as in the paper)."""
    p = "shapes-" if result["features"] == "shapes" else ""
    head = "| eta | " + " | ".join(f"S = {s}" for s in result["steps"]) + " |\n"
    rule = "|---|" + "---:|" * len(result["steps"]) + "\n"
    fid = "".join(f"| {eta:g} | " + " | ".join(f"{cell(result, eta, s)['fid']:.2f}" for s in result["steps"])
                  + " |\n" for eta in result["etas"])
    acc = "".join(f"| {eta:g} | " + " | ".join(f"{cell(result, eta, s)['judge_all']:.1f}%" for s in result["steps"])
                  + " |\n" for eta in result["etas"])
    kid = "".join(f"| {eta:g} | " + " | ".join(
        f"{cell(result, eta, s)['kid']:.3f} ± {cell(result, eta, s)['kid_stderr']:.3f}" for s in result["steps"])
        + " |\n" for eta in result["etas"])
    return (f"{p}FID ({result['num_fake']} generated vs {result['num_real']} held-out real images; lower is better)\n\n"
            + head + rule + fid + f"\n{p}KID ± standard error over subsets (lower is better)\n\n"
            + head + rule + kid + "\nshapes judge, all three attributes correct (higher is better)\n\n"
            + head + rule + acc
            + f"\nnoise floor: {result['num_fake']} other real images against the same real set score "
            f"{p}FID {result['real_floor_fid']:.2f} ± {result['real_floor_fid_std']:.2f} (10 draws)\n")


def plot(result: dict, path: str | Path) -> None:
    """shapes-FID and judge accuracy against S, one line per eta (log-x as the paper's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for eta in result["etas"]:
        row = [cell(result, eta, s) for s in result["steps"]]
        ax_fid.plot(result["steps"], [c["fid"] for c in row], marker="o", label=f"eta = {eta:g}")
        ax_acc.plot(result["steps"], [c["judge_all"] for c in row], marker="o", label=f"eta = {eta:g}")
    floor, spread = result["real_floor_fid"], result["real_floor_fid_std"]
    ax_fid.axhline(floor, color="grey", linestyle="--", label="real vs real (noise floor)")
    ax_fid.axhspan(floor - spread, floor + spread, color="grey", alpha=0.15)
    p = "shapes-" if result["features"] == "shapes" else ""
    for ax, label in ((ax_fid, f"{p}FID (lower is better)"), (ax_acc, "judge all-three accuracy, %")):
        ax.set_xscale("log")
        ax.set_xticks(result["steps"], [str(s) for s in result["steps"]])
        ax.set_xlabel("DDIM steps S")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"DDIM steps x eta on the default shapes model ({result['num_fake']} images per cell)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: dict, json_path: str | Path) -> tuple[Path, Path, Path]:
    """JSON, markdown (.md) and plot (.png) beside each other; each written then renamed."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    for path, write in ((json_path, lambda p: p.write_text(json.dumps(result, indent=1))),
                        (md_path, lambda p: p.write_text(markdown(result))),
                        (png_path, lambda p: plot(result, p))):
        tmp = path.with_name(path.name + ".tmp" + path.suffix)
        write(tmp)
        tmp.replace(path)
    return json_path, md_path, png_path

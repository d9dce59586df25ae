"""Feature networks of ldm.eval: shapes CNN, Inception (random weights), OpenCLIP score; DDIM table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.data.shapes import ShapesDataset, all_triples, render
from ldm.eval import EvalError
from ldm.eval.shapes_features import DEFAULT_WEIGHTS, FEATURE_DIM, ShapesExtractor

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 1}}


def shapes_images(num: int, seed: int) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """Rendered images [N, 64, 64, 3] and their triples."""
    dataset = ShapesDataset(num, seed=seed)
    specs = [dataset.spec(i)[0] for i in range(num)]
    return np.stack([render(s, 64) for s in specs]), [s.triple for s in specs]


def test_shapes_asset_small_and_accurate() -> None:
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    extractor = ShapesExtractor()
    images, triples = shapes_images(200, seed=424242)
    feats, probs = extractor(images)
    assert feats.shape == (200, FEATURE_DIM) and probs.shape == (200, len(all_triples()))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    names = all_triples()
    accuracy = np.mean([names[i] == t for i, t in zip(probs.argmax(1), triples)])
    assert accuracy > 0.9


def test_shapes_features_resize_other_sizes() -> None:
    extractor = ShapesExtractor()
    images, _ = shapes_images(4, seed=5)
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # 128x128, same content
    f64, p64 = extractor(images)
    f128, p128 = extractor(big)
    # Downscaling a pixel-doubled image is not exactly the identity (antialiasing blurs edges).
    assert np.abs(f64 - f128).max() < 0.1 * np.abs(f64).max()
    assert (p64.argmax(1) == p128.argmax(1)).all()


def test_shapes_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="train_shapes_features.py"):
        ShapesExtractor(tmp_path / "none.safetensors")


@pytest.mark.slow
def test_inception_extractor_with_random_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from ldm.eval.inception import InceptionExtractor

    with monkeypatch.context() as m:  # build the architecture once without any weights file
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        m.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
        net = FeatureExtractorInceptionV3("x", ["2048"])
    torch.save(net.state_dict(), tmp_path / "random-inception.pth")
    # The network resizes every input to 299x299; 96x96 keeps this test fast on a CPU and still
    # runs every layer (the pooling before the classifier is adaptive).
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 96)
    extractor = InceptionExtractor(tmp_path / "random-inception.pth")
    images, _ = shapes_images(2, seed=3)
    feats, probs = extractor(images)
    assert feats.shape == (2, 2048) and probs.shape == (2, 1008)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random tiny OpenCLIP model: its config .json and its weights file."""
    import open_clip

    root = tmp_path_factory.mktemp("clip")
    config = root / "tiny-eval-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-eval-clip")
    torch.save(model.state_dict(), root / "tiny-eval-clip.pt")
    return config, root / "tiny-eval-clip.pt"


def test_clip_score_tiny_model(tiny_clip) -> None:
    from ldm.eval.clip_score import ClipScorer

    config, weights = tiny_clip
    scorer = ClipScorer(str(config), weights, batch_size=2)
    images, triples = shapes_images(3, seed=9)
    prompts = [f"a {c} {s} on a {b} background" for c, s, b in triples]
    sims = scorer.similarities(list(images), prompts)
    assert sims.shape == (3,) and np.all(np.abs(sims) <= 1.0 + 1e-6)
    # The same pairs one at a time give the same cosines (batching changes nothing).
    single = np.array([scorer.similarities([im], [p])[0] for im, p in zip(images, prompts)])
    np.testing.assert_allclose(sims, single, atol=1e-5)
    assert scorer.score(list(images), prompts) == pytest.approx(100 * np.clip(sims, 0, None).mean())
    with pytest.raises(EvalError, match="one prompt per image"):
        scorer.similarities(list(images), prompts[:2])


def test_clip_bad_inputs(tiny_clip, tmp_path: Path) -> None:
    from ldm.eval.clip_score import ClipScorer

    config, weights = tiny_clip
    with pytest.raises(EvalError, match="CLIP weights not found"):
        ClipScorer(str(config), tmp_path / "none.pt")
    with pytest.raises(EvalError, match="unknown OpenCLIP model"):
        ClipScorer("no-such-arch", weights)
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(EvalError, match="cannot load CLIP weights"):
        ClipScorer(str(config), tmp_path / "bad.pt")


@pytest.mark.slow
def test_ddim_table_small(tmp_path: Path) -> None:
    import ldm
    from ldm.eval.ddim_table import markdown, run_table, write_outputs

    pipe = ldm.load_pipeline(str(Path(ldm.__file__).parent / "assets" / "shapes.safetensors"))
    n = FEATURE_DIM + 1
    options = ldm.SamplingOptions(guidance_scale=1.0)
    kwargs = dict(batch=n, steps=(1,), etas=(0.0, 1.0), log=lambda line: None, save_dir=tmp_path / "cells")
    result = run_table(pipe, options, ShapesExtractor, n, 40, **kwargs)
    # A rerun reuses the saved cells (same images, same scores) instead of generating again.
    again = run_table(None, options, ShapesExtractor, n, 40, **kwargs)
    assert again["cells"] == result["cells"]
    assert [(c["eta"], c["steps"]) for c in result["cells"]] == [(0.0, 1), (1.0, 1)]
    assert all(c["fid"] > 0 and 0 <= c["judge_all"] <= 100 for c in result["cells"])
    table = markdown(result)
    assert "| eta | S = 1 |" in table and "| 1 |" in table and "shapes-KID" in table and "noise floor" in table
    assert result["real_floor_fid"] > 0
    paths = write_outputs(result, tmp_path / "t.json")
    assert all(p.is_file() for p in paths) and not list(tmp_path.glob("*.tmp*"))

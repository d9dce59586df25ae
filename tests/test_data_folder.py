"""Image folder data: captions (.txt / metadata.jsonl), crops, skipping bad files, sharded batches."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from ldm.data.folder import DataError, ImageFolder
from ldm.data.sampling import ShardedBatches
from train_helpers import make_folder


def test_txt_captions_center_crop_and_range(tmp_path):
    root = make_folder(tmp_path / "imgs", count=3, size=(24, 16))
    data = ImageFolder(root, 16)
    image, caption = data[(1, 123)]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert caption == (root / "001.txt").read_text()
    # centre crop of a 24x16 image keeps columns 4..20
    raw = torch.from_numpy(__import__("numpy").asarray(Image.open(root / "001.png"))).permute(2, 0, 1)
    assert torch.equal(((image + 1) * 127.5).round().to(torch.uint8), raw[:, :, 4:20])


def test_metadata_jsonl_and_missing_captions(tmp_path):
    root = make_folder(tmp_path / "imgs", count=2, captions=False)
    with pytest.raises(DataError, match="2 of 2 images .* have no caption"):
        ImageFolder(root, 16)
    assert ImageFolder(root, 16, require_captions=False)[(0, 0)][1] == ""
    rows = [{"file_name": "000.png", "text": "first"}, {"file_name": "001.png", "text": "second"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ImageFolder(root, 16).captions == ["first", "second"]


def test_empty_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ImageFolder(tmp_path / "nope", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty", 16)


@pytest.mark.parametrize("in_memory", [True, False])
def test_unreadable_images_are_skipped_with_a_count(tmp_path, in_memory, caplog):
    root = make_folder(tmp_path / "imgs", count=3)
    (root / "001.png").write_bytes(b"not a png")
    data = ImageFolder(root, 16, in_memory=in_memory)
    images = [data[(i, 0)][0] for i in range(len(data))]  # never raises
    assert all(im.shape == (3, 16, 16) for im in images)
    assert data.skipped >= 1
    assert "unreadable" in caplog.text


def test_random_crop_and_flip_depend_only_on_the_seed(tmp_path):
    root = make_folder(tmp_path / "imgs", count=1, size=(30, 20))
    data = ImageFolder(root, 16, random_crop=True, flip=True)
    a, b = data[(0, 5)][0], data[(0, 5)][0]
    assert torch.equal(a, b)
    variants = {data[(0, seed)][0].sum().item() for seed in range(20)}
    assert len(variants) > 1


def test_sharded_batches_split_the_global_batch_and_resume():
    single = ShardedBatches(10, 4, seed=3)
    ranks = [ShardedBatches(10, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for position in range(6):  # crosses epoch boundaries
        assert ranks[0].batch(position) + ranks[1].batch(position) == single.batch(position)
    it = iter(ShardedBatches(10, 4, seed=3, position=4))
    assert next(it) == single.batch(4)
    epoch0 = [i for p in range(5) for i, _ in single.batch(p)][:10]
    assert sorted(epoch0) == list(range(10))
    with pytest.raises(ValueError, match="divisible"):
        ShardedBatches(10, 3, world_size=2)


def _write_shards(root, shards=2, per_shard=5):
    import io
    import webdataset as wds
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(root / f"shard-{s:03d}.tar")) as writer:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.new("RGB", (20, 18), (40 * i, 100 * s, 90)).save(buf, format="PNG")
                writer.write({"__key__": f"{s}_{i}", "png": buf.getvalue(), "txt": f"image {s} {i}"})
    return root


def test_webdataset_shards_stream_per_rank_and_resume(tmp_path):
    from ldm.data.webdataset import ShardStream
    from ldm.train.config import DataConfig
    root = _write_shards(tmp_path / "shards")
    config = DataConfig(kind="webdataset", path=str(root / "shard-{000..001}.tar"), size=16, flip=True)
    stream = ShardStream(config, 4, seed=1)
    it = stream.batches_from(0)
    batches = [next(it) for _ in range(4)]
    images, captions = batches[0]
    assert images.shape == (4, 3, 16, 16) and all(c.startswith("image ") for c in captions)
    resumed = next(ShardStream(config, 4, seed=1).batches_from(3))
    assert torch.equal(resumed[0], batches[3][0]) and resumed[1] == batches[3][1]
    # two ranks read disjoint shards
    rank_caps = [set(c for _, caps in [next(ShardStream(config, 4, 1, r, 2).batches_from(0))] for c in caps)
                 for r in range(2)]
    assert {c.split()[1] for c in rank_caps[0]} == {"0"} and {c.split()[1] for c in rank_caps[1]} == {"1"}
    with pytest.raises(DataError, match="no WebDataset shards"):
        ShardStream(DataConfig(kind="webdataset", path=str(tmp_path / "none-{0..1}.tar")), 4, 0)

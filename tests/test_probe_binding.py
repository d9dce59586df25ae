"""scripts/probe_binding.py: per-pair measures of colour binding, swaps counted per pair."""
from __future__ import annotations

import json

import pytest
from conftest import load_script, tiny_pipeline

probe = load_script("probe_binding")


def test_swaps_are_counted_per_unordered_pair() -> None:
    predictions = [
        {"truth": ["green", "circle", "blue"], "predicted": ["blue", "circle", "green"]},   # swap
        {"truth": ["blue", "square", "green"], "predicted": ["blue", "square", "green"]},   # right
        {"truth": ["blue", "square", "green"], "predicted": ["green", "circle", "blue"]},   # not a swap
        {"truth": ["red", "circle", "white"], "predicted": ["white", "circle", "red"]},     # swap
    ]
    counts = probe.swap_counts(predictions)
    assert len(counts) == 28
    assert counts[("green", "blue")] == (1, 3) and counts[("red", "white")] == (1, 1)
    assert sum(n for _, n in counts.values()) == 4


def test_spearman_follows_ranks() -> None:
    assert probe.spearman([1, 2, 3, 4], [0, 1, 5, 9]) == pytest.approx(1.0)
    assert probe.spearman([1, 2, 3, 4], [9, 5, 1, 0]) == pytest.approx(-1.0)
    assert probe.spearman([1, 2, 3, 4], [0, 0, 0, 0]) != probe.spearman([1, 2, 3, 4], [0, 0, 0, 0])


def test_probe_of_a_tiny_model(tmp_path, capsys) -> None:
    ckpt = tmp_path / "tiny.safetensors"
    tiny_pipeline().save(ckpt)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"predictions": [
        {"truth": ["green", "circle", "blue"], "predicted": ["blue", "circle", "green"]}]}))
    out = tmp_path / "probe.json"
    assert probe.main(["--ckpt", str(ckpt), "--results", str(results), "--images", "20",
                       "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert len(table["pairs"]) == 28 and table["vae_round_trip"]["images"] == 20
    orders = [row["text_order"] for row in table["pairs"]]
    assert orders == sorted(orders) and all(x > 0 for x in orders)   # the two orders differ
    assert all(row["latent_distance"] > 0 for row in table["pairs"])
    green_blue = next(row for row in table["pairs"] if row["pair"] == ["green", "blue"])
    assert (green_blue["swaps"], green_blue["scored"]) == (1, 1)
    assert "VAE round trip" in capsys.readouterr().out


def test_missing_results_is_one_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        probe.parse_args(["--results", str(tmp_path / "none.json")])
    assert stop.value.code == 2
    assert "results file not found" in capsys.readouterr().err

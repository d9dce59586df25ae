"""The fast default path: precision and memory format decided per CPU, decisions remembered."""
from __future__ import annotations

import json

import pytest
import torch

import ldm
from ldm.cpu import CpuInfo, cpu_info
from ldm.inference import autotune
from ldm.inference.setup import default_precision
from ldm.pipeline import Pipeline

from conftest import tiny_config


def test_cpu_info_names_the_features_choices_depend_on() -> None:
    info = cpu_info()
    assert info.model_name and "family" in info.family_model
    zen4 = CpuInfo("AMD EPYC 9R14", "family 25 model 17", frozenset({"avx2", "avx512f", "avx512_bf16"}))
    xeon = CpuInfo("Intel Xeon", "family 6 model 143",
                   frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    zen3 = CpuInfo("AMD EPYC", "family 25 model 1", frozenset({"avx2", "fma"}))
    assert (zen4.native_bf16, zen4.amx_bf16) == (True, False)
    assert (xeon.native_bf16, xeon.amx_bf16) == (True, True)
    assert (zen3.native_bf16, zen3.amx_bf16) == (False, False)
    assert "avx512_bf16" in zen4.describe() and "amx_bf16" in xeon.describe()
    assert zen4.cache_key() != xeon.cache_key()


def test_default_precision_follows_native_bf16(monkeypatch) -> None:
    assert default_precision("cpu") == ("bf16" if cpu_info().native_bf16 else "fp32")
    fake = CpuInfo("x", "family 0 model 0", frozenset({"avx512_bf16"}))
    monkeypatch.setattr("ldm.inference.setup.cpu_info", lambda: fake)
    assert default_precision("cpu") == "bf16"
    assert default_precision("cuda") == "fp16"


def test_decide_measures_once_and_remembers(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = {"slow": 0, "fast": 0}

    def make(name: str, seconds: float):
        def run() -> None:
            calls[name] += 1
            import time
            time.sleep(seconds)
        return run
    candidates = {"slow": make("slow", 0.02), "fast": make("fast", 0.0)}
    assert autotune.decide("demo", "k", candidates, default="slow") == "fast"
    measured = dict(calls)
    assert measured["fast"] >= 2 and measured["slow"] >= 2
    assert autotune.decide("demo", "k", candidates, default="slow") == "fast"
    assert calls == measured  # remembered: nothing ran again
    stored = json.loads((tmp_path / "ldm" / autotune.CACHE_FILE).read_text())
    assert list(stored.values()) == ["fast"] and cpu_info().cache_key() in next(iter(stored))
    assert autotune.decide("demo", "k", candidates, default="slow", enabled=False) == "slow"
    (tmp_path / "ldm" / autotune.CACHE_FILE).write_text("{broken")  # measured again, not fatal
    assert autotune.decide("demo", "k", candidates, default="slow") == "fast"
    with pytest.raises(ValueError, match="default"):
        autotune.decide("demo", "k", candidates, default="other")


def test_a_long_measurement_says_what_it_is_doing(tmp_path, monkeypatch, capsys) -> None:
    import time
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(autotune, "NOTICE_AFTER_S", 0.05)
    assert autotune.remembered("quick", "k", lambda: "v", default="") == "v"
    assert capsys.readouterr().err == ""  # done before the notice was due
    assert autotune.remembered("slow", "k 64", lambda: time.sleep(0.5) or "v", default="") == "v"
    err = capsys.readouterr().err
    assert "measuring slow for k 64" in err and autotune.CACHE_FILE in err
    assert autotune.remembered("slow", "k 64", lambda: time.sleep(0.5) or "w", default="") == "v"
    assert capsys.readouterr().err == ""  # remembered: nothing measured, nothing said


def test_load_pipeline_gives_frozen_networks_in_the_measured_format(tmp_path) -> None:
    path = tmp_path / "tiny.safetensors"
    Pipeline.from_config(tiny_config(), seed=1).save(path)
    pipe = ldm.load_pipeline(path)
    assert pipe.dtype == (torch.bfloat16 if cpu_info().native_bf16 else torch.float32)
    assert not pipe.unet.training and not any(p.requires_grad for p in pipe.unet.parameters())
    stored = json.loads((autotune.cache_dir() / autotune.CACHE_FILE).read_text())
    dtype = str(pipe.dtype).removeprefix("torch.")
    key = (f"channels_last|unet 32x[1, 2] in 4 ctx 32 side 16 {dtype} "
           f"threads {torch.get_num_threads()}|")
    (choice,) = [v for k, v in stored.items() if k.startswith(key)]
    conv = pipe.unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == (choice == "on")
    raw = ldm.load_pipeline(path, dtype="fp32", prepare=False)
    assert raw.dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        ldm.load_pipeline(path, dtype="fp8")


def test_prepare_for_inference_converts_both_ways() -> None:
    from ldm.inference.setup import prepare_for_inference
    conv = torch.nn.Conv2d(4, 8, 3)
    prepare_for_inference(conv, channels_last=True)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    prepare_for_inference(conv, channels_last=False)
    assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)

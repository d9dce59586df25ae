"""Choices that only a measurement on this machine can make, measured once and remembered.

A decision is keyed by what it depends on (the processor and torch version from ldm.cpu, plus
the caller's key: network shape, dtype) and stored in a JSON file in the user's cache folder
($XDG_CACHE_HOME/ldm or ~/.cache/ldm). Turned off, every choice takes its fixed default, so
benchmarks and bit-exact comparisons can rule the measurement out.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from ldm.cpu import cpu_info

K = TypeVar("K")

CACHE_FILE = "autotune.json"
# A measurement still running after this many seconds says what it is doing (at SD size the
# first load measures for a few minutes; a tiny model's choices take well under a second).
NOTICE_AFTER_S = 2.0


def cache_dir() -> Path:
    """Where measured decisions are kept (read when a decision is asked for, not at import)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ldm"


def _load(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: measure again
    return data if isinstance(data, dict) else {}


def _store(path: Path, data: dict[str, str]) -> None:
    """Atomic write; a read-only cache folder only costs a measurement next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass


def best_times(candidates: dict[K, Callable[[], object]], repeats: int = 2) -> dict[K, float]:
    """Each candidate's best time in seconds, calls alternating (after one warm-up each), so a
    burst of machine noise does not favour one side."""
    for fn in candidates.values():
        fn()
    best = {name: float("inf") for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def fastest(candidates: dict[str, Callable[[], object]], repeats: int = 2) -> str:
    """Name of the candidate with the smallest best_times."""
    best = best_times(candidates, repeats)
    return min(best, key=best.get)


def decide(name: str, key: str, candidates: dict[str, Callable[[], object]], default: str,
           enabled: bool = True) -> str:
    """The remembered choice for (name, key, this CPU), measuring it once if there is none;
    `default` when autotuning is off."""
    if default not in candidates:
        raise ValueError(f"default {default!r} is not one of {sorted(candidates)}")
    return remembered(name, key, lambda: fastest(candidates), default, enabled,
                      valid=lambda value: value in candidates)


def remembered(name: str, key: str, measure: Callable[[], str], default: str,
               enabled: bool = True, valid: Callable[[str], bool] = lambda value: True) -> str:
    """What `measure` returned for (name, key, this CPU), measured once and stored (a stored
    value that is not `valid` is measured again); `default` when autotuning is off. A
    measurement that takes longer than NOTICE_AFTER_S says so on stderr."""
    if not enabled:
        return default
    path = cache_dir() / CACHE_FILE
    full_key = f"{name}|{key}|{cpu_info().cache_key()}"
    stored = _load(path).get(full_key)
    if isinstance(stored, str) and valid(stored):
        return stored
    notice = threading.Timer(NOTICE_AFTER_S, tqdm.write, (
        f"ldm: measuring {name} for {key} on this machine, once (remembered in {path}; "
        "without autotuning, e.g. --no-autotune, nothing is measured)",), {"file": sys.stderr})
    notice.daemon = True
    notice.start()
    try:
        value = measure()
    finally:
        notice.cancel()
    _store(path, {**_load(path), full_key: value})
    return value

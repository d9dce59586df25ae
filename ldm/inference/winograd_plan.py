"""Which 3x3 layers run Winograd's algorithm, and with which tile side, measured per machine.

A plan is measured once per network, input size, dtype and CPU (each distinct layer shape
timed every way, calls alternating) and remembered in the autotune cache as "layer@HxW:m"
entries; it is applied only while its transformed kernels fit in memory (ldm.models.winograd
for the algorithm, ldm.models.prepacked for the per-module switch).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from types import MappingProxyType

import torch
from tqdm import tqdm

from ldm.inference.autotune import NOTICE_AFTER_S, best_times, remembered
from ldm.models.prepacked import set_winograd, winograd_applies
from ldm.models.winograd import TILES


Arguments = tuple[tuple, dict]  # a module call's positional and keyword arguments


def module_inputs(net: torch.nn.Module, call: Callable[[], object],
                  wanted: Callable[[torch.nn.Module], bool],
                  keep: Callable[[Arguments], bool]) -> dict[torch.nn.Module, Arguments]:
    """The arguments of every `wanted` submodule of `net` in one `call`, where `keep` says
    they are of a call a plan applies to."""
    inputs: dict[torch.nn.Module, Arguments] = {}

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if keep((args, kwargs)):
            inputs[module] = (args, kwargs)
    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in net.modules()
             if wanted(m)]
    try:
        call()
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def conv_inputs(net: torch.nn.Module,
                call: Callable[[], object]) -> dict[torch.nn.Module, torch.Size]:
    """The channels_last input shape of every convolution Winograd's algorithm applies to, in
    one call."""
    calls = module_inputs(net, call, winograd_applies,  # channels_last: the only calls it takes
                          lambda a: a[0][0].is_contiguous(memory_format=torch.channels_last))
    return {conv: args[0].shape for conv, (args, _) in calls.items()}


# Winograd's transformed kernels ((m + 2)^2 / 9 of each chosen layer's weight: 1.5-4 GB for
# the SD U-Net in fp32) are made only while they take at most this share of the memory still
# available.
WINOGRAD_MEMORY_SHARE = 0.5
# Each step up the ladder direct -> F(2x2) -> F(4x4) costs memory (a transformed kernel of 16/9,
# then 4x the weight), so a layer takes a step only where it needs at most this share of the
# time of the step below: a few percent do not pay for the memory (and are within the
# machine's noise). At 512 px this leaves the SD U-Net's 8x8-pixel layers (1280 channels, a
# third of its weights) direct or on F(2x2).
WINOGRAD_MAX_RATIO = 0.85


def choose_winograd(net: torch.nn.Module, call: Callable[[], object], key: str,
                    dtype: torch.dtype, device: str | torch.device = "cpu",
                    autotune: bool = True) -> int:
    """Winograd's F(m x m, 3x3) (m = 2 or 4) or the direct convolution, per 3x3 layer of `net`
    at its input in `call` (one inference call): each layer timed every way once per CPU and
    `key` (what the inputs depend on, winograd_tile), the plan remembered and added to the
    sides decided before; other input sides stay direct. Only fp32 channels_last CPU calls take
    it (ldm.models.winograd); without autotuning every layer is direct. The transformed kernels
    take at most WINOGRAD_MEMORY_SHARE of the memory available now: F(4x4) layers fall back to
    F(2x2), then every layer to direct, where they would not. Returns how many layers use
    it."""
    if not autotune or dtype != torch.float32 or torch.device(device).type != "cpu":
        return set_winograd(net, lambda conv: {})
    names = {module: name for name, module in net.named_modules()}

    def measure() -> str:
        plan: list[str] = []
        tiles: dict[tuple, int | None] = {}  # per layer shape: layers repeat in a U-Net
        layers = conv_inputs(net, call).items()
        for conv, shape in tqdm(layers, desc="timing 3x3 layers", unit="layer", leave=False,
                                delay=NOTICE_AFTER_S):
            shape_key = (conv.in_channels, conv.out_channels, *shape)
            if shape_key not in tiles:
                tiles[shape_key] = winograd_tile(conv, shape, device)
            if tiles[shape_key] is not None:
                plan.append(f"{names[conv]}@{shape[-2]}x{shape[-1]}:{tiles[shape_key]}")
        return ";".join(plan)
    plan = remembered("winograd", key, measure, default="", valid=_is_plan)
    chosen: dict[str, dict[tuple[int, int], int]] = {}
    for entry in filter(None, plan.split(";")):
        name, side_tile = entry.rsplit("@", 1)
        side, m = side_tile.split(":")
        chosen.setdefault(name, {})[tuple(int(v) for v in side.split("x"))] = int(m)
    # Speed is not worth running out of memory: where the plan's kernels would not fit, its
    # F(4x4) layers take F(2x2) (a kernel 4/9 the size), and where those would not fit either,
    # every layer stays direct.
    available = available_memory_bytes()
    for largest in sorted(TILES, reverse=True):
        capped = {name: {side: min(m, largest) for side, m in tiles.items()}
                  for name, tiles in chosen.items()}
        kernels = sum((m + 2) ** 2 / 9 * conv.weight.nbytes for conv, name in names.items()
                      for m in set(capped.get(name, {}).values()))
        if available is None or kernels <= WINOGRAD_MEMORY_SHARE * available:
            return set_winograd(net, lambda conv: {**getattr(conv, "winograd_tiles", {}),
                                                   **capped.get(names[conv], {})})
    return set_winograd(net, lambda conv: {})


def _is_plan(plan: str) -> bool:
    """A remembered plan in the current format: "name@HxW:m" entries joined by ";"."""
    return all(re.fullmatch(r"[\w.]+@\d+x\d+:\d+", entry) is not None
               for entry in filter(None, plan.split(";")))


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def winograd_tile(conv: torch.nn.Module, shape: torch.Size,
                  device: str | torch.device) -> int | None:
    """The tile side m one layer should use on a channels_last input of `shape`, None for the
    direct convolution: each way timed on a random input (calls alternating), a larger tile
    taken only for WINOGRAD_MAX_RATIO of the time of the choice below it. The layer is left as
    it was."""
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    side = (shape[-2], shape[-1])
    before = dict(getattr(conv, "winograd_tiles", {}))
    set_winograd(conv, lambda _: {**before, side: TILES[0]})  # a PrepackedConv2d now

    def timed(m: int | None) -> Callable[[], None]:
        tiles = MappingProxyType({k: v for k, v in {**before, side: m}.items() if v is not None})

        def run() -> None:
            conv.winograd_tiles = tiles  # not set_winograd: that would drop kernels
            with torch.inference_mode():
                conv(x)
        return run
    times = best_times({m: timed(m) for m in (None, *TILES)})
    set_winograd(conv, lambda _: before)
    choice = None
    for m in TILES:
        if times[m] <= WINOGRAD_MAX_RATIO * times[choice]:
            choice = m
    return choice

"""Which upsampling blocks run folded and which the direct form, measured per machine.

Folding the nearest-2x upsampling into the 3x3 convolution (ldm.models.upsample) does 2.25x
fewer multiply-adds, but writes its four output phases apart with strided copies and convolves
a 4x wider output. Where the direct form's convolution is cheaper per multiply-add (AMX tiles
in bf16; Winograd's F(4x4, 3x3) in fp32, 2.25 multiplies per output against folding's 4) it
can win. Measured on AMD EPYC Zen 3 (AVX2), fp32, SD 2.1-base at 512 px: the direct form with
F(4x4) took 0.82-0.86x the folded time in the U-Net's three blocks and the decoder's two
512-channel ones (its 256-channel 256x256 block stays folded); the U-Net call 0.98x, the
decode 0.95x (docs/performance.md). Without Winograd (bf16, or another CPU) folding was 1.3-2x
faster there.

A plan is measured once per network, input size, dtype and CPU (each block's input timed both
ways, calls alternating; in fp32 the direct form with the tile its convolution measures best
with, ldm.inference.winograd_plan.winograd_tile) and remembered in the autotune cache as
"block@HxW" entries, the blocks that take the direct form at that input side.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
from tqdm import tqdm

from ldm.inference.autotune import NOTICE_AFTER_S, best_times, remembered
from ldm.inference.winograd_plan import Arguments, module_inputs, winograd_tile
from ldm.models.prepacked import set_winograd
from ldm.models.upsample import Upsample, set_upsampling

# The direct form costs a 4x larger upsampled activation (and, with Winograd, a transformed
# kernel), so a block takes it only where it needs at most this share of the folded time: a
# few percent are within the machine's noise.
DIRECT_MAX_RATIO = 0.9


def upsample_inputs(net: torch.nn.Module,
                    call: Callable[[], object]) -> dict[Upsample, torch.Tensor]:
    """The input of every 2x Upsample block in one call (blocks given a target size other
    than 2x always take the direct form)."""
    def doubled(arguments: Arguments) -> bool:
        args, kwargs = arguments
        size = kwargs.get("size", args[1] if len(args) > 1 else None)
        return size is None or tuple(size) == (2 * args[0].shape[-2], 2 * args[0].shape[-1])
    calls = module_inputs(net, call, lambda m: isinstance(m, Upsample), doubled)
    return {block: args[0] for block, (args, _) in calls.items()}


def direct_is_faster(block: Upsample, x: torch.Tensor) -> bool:
    """Whether the direct form takes at most DIRECT_MAX_RATIO of the folded time on x (its
    convolution with the Winograd tile it measures best with, where that applies). The block
    is left as it was."""
    side = tuple(x.shape[-2:])
    upsampled = (*x.shape[:2], 2 * side[0], 2 * side[1])
    winograd = (x.dtype == torch.float32 and x.device.type == "cpu"
                and x.is_contiguous(memory_format=torch.channels_last))
    m = winograd_tile(block.conv, torch.Size(upsampled), x.device) if winograd else None
    before = dict(getattr(block.conv, "winograd_tiles", {}))
    if m is not None:
        set_winograd(block.conv, lambda conv: {**before, upsampled[-2:]: m})

    def timed(direct: bool) -> Callable[[], None]:
        def run() -> None:
            block.direct_sides = frozenset({side}) if direct else frozenset()
            with torch.inference_mode():
                block(x)
        return run
    saved = block.direct_sides
    try:
        times = best_times({"folded": timed(False), "direct": timed(True)})
    finally:
        block.direct_sides = saved
        set_winograd(block.conv, lambda conv: before)
    return times["direct"] <= DIRECT_MAX_RATIO * times["folded"]


def choose_upsampling(net: torch.nn.Module, call: Callable[[], object], key: str,
                      device: str | torch.device = "cpu", autotune: bool = True) -> str:
    """Folded or direct, per Upsample block of `net` at its input in `call` (one inference
    call): measured once per CPU and `key` (what the inputs depend on), remembered and added
    to the sides decided before. Off the CPU or without autotuning every block is folded.
    Returns the plan: "block@HxW" entries joined by ";", empty where every block is folded."""
    if not autotune or torch.device(device).type != "cpu":
        set_upsampling(net, lambda block: ())
        return ""
    names = {module: name for name, module in net.named_modules()}

    def measure() -> str:
        plan: list[str] = []
        chosen: dict[tuple, bool] = {}  # per block shape: blocks repeat
        for block, x in tqdm(upsample_inputs(net, call).items(), desc="timing upsampling",
                             unit="block", leave=False, delay=NOTICE_AFTER_S):
            shape_key = (block.conv.in_channels, block.conv.out_channels, *x.shape)
            if shape_key not in chosen:
                chosen[shape_key] = direct_is_faster(block, x)
            if chosen[shape_key]:
                plan.append(f"{names[block]}@{x.shape[-2]}x{x.shape[-1]}")
        return ";".join(plan)
    plan = remembered("upsampling", key, measure, default="", valid=_is_plan)
    direct: dict[str, set[tuple[int, int]]] = {}
    for entry in filter(None, plan.split(";")):
        name, side = entry.rsplit("@", 1)
        direct.setdefault(name, set()).add(tuple(int(v) for v in side.split("x")))
    set_upsampling(net, lambda block: block.direct_sides | direct.get(names[block], set()))
    return plan


def _is_plan(plan: str) -> bool:
    """A remembered plan in the current format: "name@HxW" entries joined by ";"."""
    return all(re.fullmatch(r"[\w.]+@\d+x\d+", entry) is not None
               for entry in filter(None, plan.split(";")))

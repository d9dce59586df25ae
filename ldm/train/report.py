"""What a run leaves for people: metrics.jsonl, the loss-curve PNG, image grids."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class MetricsLog:
    """Append-only JSON lines of {step, name: value}; resuming drops entries past the resume step."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, float]] = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if resume_step is None or row.get("step", 0) <= resume_step:
                    self.rows.append(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict[str, float]) -> None:
        """Record one row and flush it to disk."""
        self.rows.append(row)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def plot_curves(rows: list[dict[str, float]], path: Path, title: str) -> None:
    """One panel per logged quantity (log-scale y where positive), written atomically as PNG."""
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in rows[-1] if k not in ("step", "steps_per_s")]
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
        if not pts:
            continue
        steps, values = zip(*pts)
        ax.plot(steps, values, linewidth=1.2)
        if key.startswith("loss") and min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def save_grid(images: torch.Tensor, path: Path, ncols: int) -> None:
    """Save [N, 3, H, W] images in [-1, 1] as one PNG grid (atomically)."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, _, h, w = images.shape
    nrows = math.ceil(n / ncols)
    grid = torch.full((3, nrows * (h + 2) + 2, ncols * (w + 2) + 2), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = images[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    Image.fromarray(np.ascontiguousarray(grid.permute(1, 2, 0).numpy())).save(tmp)
    tmp.replace(path)

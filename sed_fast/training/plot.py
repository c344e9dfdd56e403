"""The loss curve of a run (``loss_curve.png``): matplotlib when installed, else a plain PIL drawing."""
from __future__ import annotations

from pathlib import Path
from typing import List

from ..base.files import atomic_write

_KEYS = ("total_loss", "loss_sem_seg_0", "loss_sem_seg_1", "loss_sem_seg_2", "loss_sem_seg_3")


def loss_curve(history: List[dict], path: Path) -> None:
    """Plot each loss against the iteration, written atomically to ``path``."""
    xs = [r["iteration"] + 1 for r in history]
    series = {k: [r.get(k) for r in history] for k in _KEYS if any(k in r for r in history)}
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        _pil_curve(xs, series.get("total_loss", []), path)
        return
    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        for key, values in series.items():
            axis.plot(xs, values, label=key, linewidth=1.5 if key == "total_loss" else 0.8)
        axis.set_xlabel("iteration")
        axis.set_ylabel("loss")
        axis.set_title("sed-fast train")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        atomic_write(path, lambda f: figure.savefig(f, format="png"))
    finally:
        plt.close(figure)


def _pil_curve(xs, ys, path: Path) -> None:
    from PIL import Image, ImageDraw

    width, height, margin = 800, 450, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(points) >= 2:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        sx = (width - 2 * margin) / max(x1 - x0, 1)
        sy = (height - 2 * margin) / max(y1 - y0, 1e-12)
        draw.line([(margin + (x - x0) * sx, height - margin - (y - y0) * sy) for x, y in points], fill="blue")
        draw.text((margin, 10), f"total_loss {y1:.4g} .. {y0:.4g}, iterations {x0}..{x1}", fill="black")
    draw.rectangle([margin, margin, width - margin, height - margin], outline="gray")
    atomic_write(path, lambda f: image.save(f, format="PNG"))

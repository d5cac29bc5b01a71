"""Pictures people would rather look at than read: sample grids and curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def sample_grid(
    images: np.ndarray,
    captions: Sequence[str],
    scores: Sequence[float] | None = None,
    columns: int = 8,
    scale: int = 4,
) -> Image.Image:
    """A grid of uint8 images (B, H, W, 3), each upscaled ``scale`` x with its caption below.

    Captions are wrapped to the cell width; a score, when given, is appended as ``[0.67]`` and
    coloured green for 1.0, red below.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    n, h, w = images.shape[0], images.shape[1] * scale, images.shape[2] * scale
    cols = max(1, min(columns, n))
    rows = (n + cols - 1) // cols
    font = ImageFont.load_default()
    chars = max(8, w // 6)
    text_h = 4 * 11 + 4
    grid = Image.new("RGB", (cols * (w + 4) + 4, rows * (h + text_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = 4 + (i % cols) * (w + 4), 4 + (i // cols) * (h + text_h + 4)
        grid.paste(Image.fromarray(images[i]).resize((w, h), Image.Resampling.NEAREST), (x, y))
        lines = _wrap(captions[i], chars)[:3]
        colour = "black"
        if scores is not None:
            lines.append(f"[{scores[i]:.2f}]")
            colour = "darkgreen" if scores[i] >= 1.0 else "firebrick"
        for k, line in enumerate(lines):
            draw.text((x, y + h + 2 + 11 * k), line, fill=colour, font=font)
    return grid


def save_sample_grid(
    path: str | Path,
    images: np.ndarray,
    captions: Sequence[str],
    scores: Sequence[float] | None = None,
    columns: int = 8,
) -> Path:
    """Write ``sample_grid(...)`` as a PNG, creating parent directories."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sample_grid(images, captions, scores, columns=columns).save(out)
    return out


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Reward per round and held-out accuracy per evaluation, as one PNG (None if no data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in history if "reward/mean" in r]
    if not rounds:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    x = [r["round"] for r in rounds]
    reward = np.array([r["reward/mean"] for r in rounds], dtype=float)
    ax[0].plot(x, reward, label="reward (mean)", alpha=0.45)
    if len(reward) >= 6:  # a round's prompts vary in difficulty: show the trend too
        w = max(3, len(reward) // 8)
        ax[0].plot(
            x[w - 1 :],
            np.convolve(reward, np.ones(w) / w, "valid"),
            lw=2.2,
            label=f"reward, {w}-round mean",
        )
    if "reward/accuracy" in rounds[0]:
        ax[0].plot(x, [r["reward/accuracy"] for r in rounds], label="rollout accuracy", alpha=0.45)
    ax[0].set_xlabel("round")
    ax[0].legend()
    ax[0].set_title("training rollouts")
    _plot_evals(ax[1], [r for r in history if any(k.startswith("eval/") for k in r)])
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_evals(ax: Any, evals: Sequence[dict[str, Any]]) -> None:
    """Held-out curves: GenEval's overall score (the mean over categories) in bold and each
    category thin, where the world reports categories; accuracy and mean reward otherwise."""
    x = [r["round"] for r in evals]
    cats = sorted({k for r in evals for k in r if k.startswith("eval/category_")})
    if cats and all("eval/overall" in r for r in evals):
        ax.plot(x, [r["eval/overall"] for r in evals], "o-", lw=2.6, color="k", label="overall")
        for key in cats:
            ys = [r.get(key, float("nan")) for r in evals]
            ax.plot(x, ys, ".-", lw=1.2, alpha=0.8, label=key.removeprefix("eval/category_"))
        ax.set_ylabel("held-out accuracy")
        ax.legend(fontsize=7, ncol=2)
    elif all("eval/accuracy" in r for r in evals):
        ax.plot(x, [r["eval/accuracy"] for r in evals], "o-", label="held-out accuracy")
        ax.plot(x, [r["eval/mean_reward"] for r in evals], "s--", label="held-out mean reward")
        ax.legend()
    watched = sorted({k for r in evals for k in r if k.startswith("eval/reward_")})
    watched = [k for k in watched if k != "eval/reward_valid_fraction"]
    if watched:  # eval.rewards: on a second axis beside the verifier's curves, or alone
        wax = ax.twinx() if any("eval/accuracy" in r for r in evals) else ax
        for key in watched:
            ys = [r.get(key, float("nan")) for r in evals]
            wax.plot(x, ys, "^:", label=key.removeprefix("eval/"))
        wax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("round (0 = the initial weights)")
    ax.grid(alpha=0.3)  # autoscaled: changes of a few points are what RL makes here
    ax.set_title("held-out evaluation")

"""Figures: the book's chapter-5 loss plot, and where the companion notebooks write theirs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def figure_dir(notebook_file: str | None = None) -> Path:
    """The folder figures go to: ``$JAXGPT_FIGURES``, else ``figures/`` beside the notebook.

    Inside Jupyter a notebook has no ``__file__``; then it is ``figures/`` in the working directory.
    The folder is created if needed.
    """
    here = Path(notebook_file).resolve().parent if notebook_file else Path.cwd()
    folder = Path(os.environ.get("JAXGPT_FIGURES", here / "figures"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_figure(fig: Any, name: str, notebook_file: str | None = None) -> Path:
    """Write a matplotlib figure as ``name`` in :func:`figure_dir`, close it and print the path."""
    import matplotlib.pyplot as plt

    path = figure_dir(notebook_file) / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"figure written: {path}")
    return path


def plot_losses(
    records: Sequence[dict[str, Any]], path: str | Path, title: str | None = None, label: str = "loss"
) -> Path:
    """Write a PNG of ``train_loss`` and ``val_loss`` against ``tokens_seen`` (book's ``plot_losses``).

    ``records`` are the evaluation records of :func:`jaxgpt.train.train` (or the lines of a run's
    ``metrics.jsonl``). A second x-axis on top shows the epoch, as in the book's figure 5.12.
    Uses matplotlib's Agg backend, so no display is needed. ``label`` names what is plotted
    (the book's ``label`` argument: "loss", or "reward margins" for DPO).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    if not records:
        raise ValueError("no evaluation records to plot")
    tokens = [r["tokens_seen"] for r in records]
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(tokens, [r["train_loss"] for r in records], label=f"Training {label}")
    ax1.plot(tokens, [r["val_loss"] for r in records], linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Tokens seen")
    if max(tokens) >= 10_000:  # 50k rather than 50000: long tick labels run into each other
        ax1.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    ax1.set_ylabel(label.capitalize())
    ax1.legend(loc="upper right")
    if title:
        ax1.set_title(title, fontsize=9)

    ax2 = ax1.twiny()  # epochs on top, aligned with the same data
    ax2.plot([r["epoch"] for r in records], [r["train_loss"] for r in records], alpha=0)
    ax2.set_xlabel("Epochs")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Reports: markdown tables and PNG charts for evaluations and studies (matplotlib, no display needed)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_path

logger = logging.getLogger(__name__)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 4 significant digits, ``None`` shows as n/a."""

    def cell(value: Any) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# Chinese category names need a CJK font; matplotlib falls back glyph by glyph through this list.
CJK_FONTS = ["Noto Sans CJK SC", "Noto Sans SC", "WenQuanYi Zen Hei", "Source Han Sans SC", "SimHei",
             "Microsoft YaHei", "PingFang SC"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    found = [name for name in CJK_FONTS if name in installed]
    if found:
        plt.rcParams["font.family"] = ["DejaVu Sans", *found]
    else:
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        if not getattr(_pyplot, "warned", False):
            logger.info("no CJK font found: Chinese labels in charts show as boxes (e.g. apt install fonts-noto-cjk)")
            _pyplot.warned = True  # type: ignore[attr-defined]
    return plt


def _save(figure: Any, path: Path) -> None:
    """Save ``figure`` to ``path`` in the format its suffix names (PNG without one), never half-written."""
    with atomic_path(path) as temporary:  # its name ends in .tmp: the format is given explicitly
        figure.savefig(temporary, dpi=110, bbox_inches="tight", format=path.suffix[1:] or "png")


def bar_chart(labels: Sequence[str], values: Sequence[float | None], path: Path, title: str, ylabel: str,
              counts: Sequence[int] | None = None) -> None:
    """One bar per label with its value written on top (and ``n=`` when counts are given); ``None`` is n/a."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.6))
    bars = axes.bar(range(len(labels)), [v or 0.0 for v in values], color="#4C72B0")
    for index, bar in enumerate(bars):
        shown = "n/a" if values[index] is None else f"{values[index]:.2f}"
        note = shown + (f"\nn={counts[index]}" if counts else "")
        axes.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                      fontsize=8)
    axes.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 3 else 0, ha="right"
                    if len(labels) > 3 else "center", fontsize=8)
    axes.set_ylim(0, max(1.0, max((v or 0.0 for v in values), default=0) * 1.25))
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    _save(figure, path)
    plt.close(figure)


def grouped_bar_chart(groups: Sequence[str], series: dict[str, Sequence[float | None]], path: Path, title: str,
                      ylabel: str) -> None:
    """Bars of several series (e.g. metrics) side by side for each group (e.g. study cell)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(series)) / 2 + 2), 3.8))
    width = 0.8 / max(1, len(series))
    for number, (name, values) in enumerate(series.items()):
        positions = [i + (number - (len(series) - 1) / 2) * width for i in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = axes.bar(positions, heights, width, label=name)
        for bar, value in zip(bars, values):
            axes.annotate("n/a" if value is None else f"{value:.2f}",
                          (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    axes.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    axes.set_ylim(0, 1.15)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=7)
    _save(figure, path)
    plt.close(figure)


def line_chart(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path, title: str, xlabel: str,
               ylabel: str) -> None:
    """Overlaid curves, one per label: ``{label: (xs, ys)}``."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for label, (xs, ys) in curves.items():
        axes.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label)
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    _save(figure, path)
    plt.close(figure)

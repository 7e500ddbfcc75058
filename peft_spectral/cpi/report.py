"""The run report of a CPI-FT pipeline: markdown summary and the Jaccard heat map."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..plots import pyplot, save_figure


__all__ = ["plot_jaccard", "report_markdown"]


def report_markdown(rep: dict) -> str:
    """The report of a run (see [`CPIPipeline.report`]) as markdown."""
    lines = ["# CPI-FT report", "", f"Tasks: {', '.join(rep['tasks'])}", ""]
    cfg = rep["config"]
    adapter = cfg["adapter"]
    lines += [
        f"p = {adapter['core_fraction']} ({adapter['core_scope']}), τ = {adapter['similarity_threshold']}, "
        f"train_params = {cfg['train_params']}, probe_steps = {cfg['probe_steps']}, "
        f"stage_steps = {cfg['stage_steps'] or cfg['probe_steps']}"
        + (f" (total {cfg['total_stage_steps']} shared by the stages)" if cfg.get("total_stage_steps") else "")
        + f", fusion = {cfg['fusion']}, stage order = {cfg['stage_order']}",
        "",
    ]
    if rep.get("jaccard") is not None:
        names = rep["tasks"]
        lines += [
            "## Jaccard similarity of core regions",
            "",
            "| | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for n, row in zip(names, rep["jaccard"]):
            lines.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        lines += ["", f"Groups: {rep['groups']}", f"Stage order: {rep['stage_order']}", ""]
    if rep.get("scores"):
        lines += ["## Scores", "", "| task | score |", "|---|---|"]
        for n, sc in rep["scores"].items():
            lines.append(f"| {n} | {json.dumps(sc)} |")
        lines.append("")
    if rep.get("timings_s"):
        lines += ["## Time per step (s)", ""] + [f"- {k}: {v:.1f}" for k, v in rep["timings_s"].items()] + [""]
    return "\n".join(lines)


def plot_jaccard(
    jaccard: np.ndarray, names: Sequence[str], path: Union[str, Path], groups: Optional[list] = None
) -> Path:
    """Save a heat map of the Jaccard matrix (annotated with the values and, optionally, the groups).

    Args:
        jaccard (`np.ndarray`): The T × T Jaccard matrix.
        names (`Sequence[str]`): The task names.
        path (`str` or `Path`): The image file (its folder is created).
        groups (`list[list[str]]`, *optional*): The groups, shown in the title.

    Returns:
        `Path`: The image file.
    """
    plt = pyplot("the CPI-FT report's plots")
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.0 * n + 2))
    im = ax.imshow(jaccard, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{jaccard[i, j]:.2f}", ha="center", va="center", color="w" if jaccard[i, j] < 0.6 else "k")
    title = "Jaccard similarity of core regions"
    if groups is not None:
        title += "\ngroups: " + "; ".join("{" + ", ".join(g) + "}" for g in groups)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path, dpi=120)

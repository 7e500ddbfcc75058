"""Plot helpers shared by the demo, the CPI-FT report and the benchmarks: matplotlib (an extra) with one clear error,
grouped bars with confidence-interval error bars, and saving a figure.

```python
from peft_spectral.plots import ci_bars, pyplot, save_figure

plt = pyplot("the report's plot")
fig, ax = plt.subplots()
ci_bars(ax, ["gcd", "lcm"], {"base": [base_gcd, base_lcm], "SVF": [svf_gcd, None]})
save_figure(fig, "accuracy.png")
```
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union


__all__ = ["ci_bar_chart", "ci_bars", "pyplot", "save_figure"]

logger = logging.getLogger(__name__)


def pyplot(purpose: str = "plots", *, required: bool = True) -> Any:
    """`matplotlib.pyplot` on the non-interactive Agg backend.

    Args:
        purpose (`str`, defaults to `"plots"`): What the plot is for, named in the error (e.g. `"the demo's plots"`).
        required (`bool`, defaults to `True`): Raise when matplotlib is missing; with `False`, log a warning and
            return `None` instead (a report that is still written without its picture).

    Returns:
        The `matplotlib.pyplot` module, or `None` (only with `required=False`) when matplotlib is not installed.

    Raises:
        `ImportError`: matplotlib is not installed (and `required` is `True`).
    """
    try:
        import matplotlib
    except ImportError as err:
        message = f"{purpose} need matplotlib: pip install 'peft-spectral[plots]' (or the 'default-model' extra)"
        if required:
            raise ImportError(message) from err
        logger.warning("%s; skipped", message)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ci_bars(
    ax: Any,
    groups: Sequence[str],
    series: Mapping[str, Sequence[Optional[Mapping[str, float]]]],
    *,
    value: str = "accuracy",
    scale: float = 1.0,
    width: float = 0.8,
) -> None:
    """Grouped bars with asymmetric error bars from confidence intervals, one group per x position.

    Args:
        ax (`matplotlib.axes.Axes`): Where to draw.
        groups (`Sequence[str]`): The x positions (`0, 1, ...`), e.g. tasks; not labelled here (`ax.set_xticks`).
        series (`Mapping[str, Sequence[Mapping | None]]`): Legend label -> one interval per group, each a mapping with
            `value`, `"low"` and `"high"` (e.g. `dataclasses.asdict` of a [`peft_spectral.stats`] interval); `None`
            where the series has no bar in that group.
        value (`str`, defaults to `"accuracy"`): The key of the bar's height (`"delta"` for paired differences).
        scale (`float`, defaults to 1.0): Multiplies heights and interval ends (`100` for points).
        width (`float`, defaults to 0.8): Width of a group; its bars share it.

    Raises:
        `ValueError`: a series does not have one entry per group.
    """
    bar = width / max(len(series), 1)
    for index, (label, intervals) in enumerate(series.items()):
        if len(intervals) != len(groups):
            raise ValueError(f"series {label!r} has {len(intervals)} entries for {len(groups)} groups")
        xs, ys, below, above = [], [], [], []
        for position, interval in enumerate(intervals):
            if interval is None:
                continue
            height = scale * interval[value]
            xs.append(position + (index - (len(series) - 1) / 2) * bar)
            ys.append(height)
            below.append(height - scale * interval["low"])
            above.append(scale * interval["high"] - height)
        if xs:
            ax.bar(xs, ys, bar, yerr=[below, above], capsize=3, label=label)


def ci_bar_chart(
    path: Union[str, os.PathLike],
    groups: Sequence[str],
    series: Mapping[str, Sequence[Optional[Mapping[str, float]]]],
    *,
    ylabel: str,
    title: Optional[str] = None,
    value: str = "accuracy",
    scale: float = 1.0,
    width: float = 0.8,
    ylim: Optional[tuple[float, float]] = None,
    zero_line: bool = False,
    figsize: tuple[float, float] = (6.0, 3.8),
    xticks: Optional[Mapping[str, Any]] = None,
    legend: Optional[Mapping[str, Any]] = None,
    dpi: int = 110,
    purpose: str = "the benchmark's plots",
    required: bool = False,
) -> Optional[Path]:
    """A whole figure of [`ci_bars`]: one group of bars per entry of `groups` (the x labels), saved to `path`.

    Args:
        path (`str` or `os.PathLike`): The image file.
        groups, series, value, scale, width: As for [`ci_bars`].
        ylabel (`str`): The y axis label.
        title (`str`, *optional*): The title.
        ylim (`tuple[float, float]`, *optional*): The y range, e.g. `(0, 1)` for accuracies.
        zero_line (`bool`, defaults to `False`): Draw y = 0 (for differences).
        figsize (`tuple[float, float]`): The figure size in inches.
        xticks (`Mapping`, *optional*): Keyword arguments for the x labels (`rotation`, `ha`, `fontsize`).
        legend (`Mapping`, *optional*): Keyword arguments of the legend.
        dpi (`int`, defaults to 110): Resolution.
        purpose, required: As for [`pyplot`]; by default a missing matplotlib only logs a warning.

    Returns:
        `Path` of the image, or `None` when matplotlib is missing and `required` is `False`.
    """
    plt = pyplot(purpose, required=required)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=figsize)
    ci_bars(ax, groups, series, value=value, scale=scale, width=width)
    if zero_line:
        ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(groups)), list(groups), **dict(xticks or {}))
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.legend(**dict(legend or {}))
    return save_figure(fig, path, dpi=dpi)


def save_figure(fig: Any, path: Union[str, os.PathLike], *, dpi: int = 110) -> Path:
    """Lay out, save (creating the folder) and close a figure; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path

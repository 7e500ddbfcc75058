"""Plot helpers shared by the demo, the CPI-FT report and the benchmarks: matplotlib (an extra) with one clear error,
grouped bars with confidence-interval error bars, and saving a figure.

```python
from peft_spectral.plots import ci_bars, pyplot, save_figure

plt = pyplot("the report's plot")
fig, ax = plt.subplots()
ci_bars(ax, ["navigate", "snarks"], {"base": [base_nav, base_snarks], "SVF": [svf_nav, None]})
save_figure(fig, "accuracy.png")
```
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union


__all__ = ["ci_bars", "pyplot", "save_figure"]

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


def save_figure(fig: Any, path: Union[str, os.PathLike], *, dpi: int = 110) -> Path:
    """Lay out, save (creating the folder) and close a figure; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path

"""`peft_spectral.plots`: the grouped CI bars against hand-computed positions and error bars, the missing-matplotlib
error, and a saved figure."""

from __future__ import annotations

import sys

import pytest

from peft_spectral.plots import ci_bar_chart, ci_bars, pyplot, save_figure


class _RecordingAxes:
    def __init__(self):
        self.bars = []

    def bar(self, xs, ys, width, *, yerr, capsize, label):
        self.bars.append({"x": xs, "y": ys, "width": width, "yerr": yerr, "label": label})


def test_ci_bars_positions_heights_and_error_bars():
    ax = _RecordingAxes()
    base = [{"accuracy": 0.5, "low": 0.4, "high": 0.7}, {"accuracy": 0.2, "low": 0.1, "high": 0.25}]
    svf = [None, {"accuracy": 0.6, "low": 0.5, "high": 0.9}]  # no bar in the first group
    ci_bars(ax, ["a", "b"], {"base": base, "svf": svf})
    first, second = ax.bars
    assert first["label"] == "base" and first["width"] == pytest.approx(0.4)
    assert first["x"] == pytest.approx([-0.2, 0.8]) and first["y"] == pytest.approx([0.5, 0.2])
    assert first["yerr"][0] == pytest.approx([0.1, 0.1]) and first["yerr"][1] == pytest.approx([0.2, 0.05])
    assert second["x"] == pytest.approx([1.2]) and second["y"] == pytest.approx([0.6])
    assert second["yerr"][0] == pytest.approx([0.1]) and second["yerr"][1] == pytest.approx([0.3])


def test_ci_bars_scales_deltas_and_checks_lengths():
    ax = _RecordingAxes()
    ci_bars(ax, ["t"], {"cem": [{"delta": -0.05, "low": -0.15, "high": 0.02}]}, value="delta", scale=100, width=0.6)
    (only,) = ax.bars
    assert (
        only["x"] == pytest.approx([0.0]) and only["width"] == pytest.approx(0.6) and only["y"] == pytest.approx([-5])
    )
    assert only["yerr"][0] == pytest.approx([10]) and only["yerr"][1] == pytest.approx([7])
    with pytest.raises(ValueError, match="series 'cem' has 2 entries for 1 groups"):
        ci_bars(ax, ["t"], {"cem": [None, None]})


def test_pyplot_without_matplotlib(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(ImportError, match=r"the demo's plots need matplotlib: pip install 'peft-spectral\[plots\]'"):
        pyplot("the demo's plots")
    assert pyplot("the benchmark's plots", required=False) is None
    assert "the benchmark's plots need matplotlib" in caplog.text


def test_save_figure_writes_the_image(tmp_path):
    pytest.importorskip("matplotlib")
    plt = pyplot()
    fig, ax = plt.subplots()
    ci_bars(ax, ["a"], {"x": [{"accuracy": 0.5, "low": 0.4, "high": 0.6}]})
    path = save_figure(fig, tmp_path / "sub" / "bars.png")
    assert path == tmp_path / "sub" / "bars.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)


def test_ci_bar_chart_saves_a_labelled_figure(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    plt = pyplot()
    figures = []
    monkeypatch.setattr("peft_spectral.plots.save_figure", lambda fig, path, dpi: figures.append((fig, path, dpi)))
    interval = {"delta": 0.1, "low": -0.05, "high": 0.2}
    ci_bar_chart(
        tmp_path / "d.png",
        ["t1", "t2"],
        {"cem": [interval, None]},
        value="delta",
        scale=100,
        ylabel="Δ",
        ylim=(-20, 30),
    )
    ((fig, path, dpi),) = figures
    ax = fig.axes[0]
    assert path == tmp_path / "d.png" and dpi == 110
    assert [t.get_text() for t in ax.get_xticklabels()] == ["t1", "t2"] and ax.get_ylabel() == "Δ"
    assert ax.get_ylim() == (-20, 30) and [t.get_text() for t in ax.get_legend().get_texts()] == ["cem"]
    (bar,) = ax.patches  # one bar: the second group has none
    assert bar.get_height() == pytest.approx(10.0)
    plt.close(fig)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert ci_bar_chart(tmp_path / "x.png", ["t"], {"a": [interval]}, ylabel="y") is None  # a warning, no picture
    with pytest.raises(ImportError, match="need matplotlib"):
        ci_bar_chart(tmp_path / "x.png", ["t"], {"a": [interval]}, ylabel="y", required=True)

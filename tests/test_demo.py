"""The demo's plumbing: resumable steps, summary table, plots and report (the full run needs the real model)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from peft_spectral.cli import build_parser, main
from peft_spectral.demo import (
    SCORING_NOTE,
    DemoConfig,
    DemoReport,
    Row,
    _Steps,
    format_table,
    plot_c2i_scores,
    plot_fitness,
    write_report,
)
from peft_spectral.state import StateFileError


def test_steps_are_cached_and_resumed(tmp_path):
    calls = []
    steps = _Steps(tmp_path)
    first = steps.run("a", lambda work: calls.append(work) or {"x": 1})
    again = _Steps(tmp_path).run("a", lambda work: calls.append(work) or {"x": 2})
    assert calls == [tmp_path / "a"] and first["x"] == again["x"] == 1 and "wall_time_s" in again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.json"]  # no temporary file left behind


def test_truncated_step_file_is_one_clear_error(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1, "wall')
    with pytest.raises(StateFileError, match=r"demo step 'a' file .*a\.json is not valid JSON"):
        _Steps(tmp_path).run("a", lambda work: {"x": 2})


def test_table_report_and_plots(tmp_path):
    history = [{"best": 0.2 + 0.1 * g, "generation_best": 0.3, "generation_mean": 0.1} for g in range(4)]
    fit = plot_fitness(history, tmp_path / "fit.png")
    iv = lambda layer, m: SimpleNamespace(layer=layer, matrix=m)  # noqa: E731
    cands = [
        SimpleNamespace(intervention=iv(i, m), score=0.01 * i - 0.1) for i in range(3) for m in ("up_proj", "o_proj")
    ]
    c2i = plot_c2i_scores(cands, tmp_path / "c2i.png")
    assert fit.read_bytes()[:4] == b"\x89PNG" and c2i.read_bytes()[:4] == b"\x89PNG"
    rows = [
        Row("SVF (GRPO)", "navigate", 0.5, 0.625, 51840, 12.0, "6 RL steps"),
        # with the per-example verdicts: n, 95% Wilson intervals and the paired Δ vs base (4/10 -> 8/10, b=0, c=4)
        Row(
            "SVF expert",
            "snarks",
            0.4,
            0.8,
            51840,
            60.0,
            "committed",
            [True] * 4 + [False] * 6,
            [True] * 8 + [False] * 2,
        ),
    ]
    table = format_table(rows)
    assert "| SVF (GRPO) | navigate | 0.500 | 0.625 | — | 51,840 | 12 | 6 RL steps |" in table
    assert "| SVF expert | snarks | 0.400 [0.17, 0.69] (n=10) | 0.800 [0.49, 0.94] (n=10) | +0.400 [" in table
    assert "+0.400 [+0.10, +0.70] p=0.12 * |" in table and "Δ vs base [95% CI]" in table
    assert table.endswith(SCORING_NOTE) and "log-likelihood" in SCORING_NOTE  # the reader is told how it scored
    report = DemoReport(rows=rows, plots={"cem_fitness": str(fit), "c2i_scores": str(c2i)})
    write_report(report, tmp_path / "report.md", table)
    text = (tmp_path / "report.md").read_text()
    assert "![cem_fitness](fit.png)" in text and "![c2i_scores](c2i.png)" in text


def test_cli_demo_options():
    args = build_parser().parse_args(["demo", "--quick", "--output", "x", "--unseen-task", "snarks"])
    assert args.quick and args.output == "x" and args.unseen_task == "snarks"
    quick = DemoConfig.quick(unseen_task="snarks")
    assert quick.svf_steps < DemoConfig().svf_steps and quick.unseen_task == "snarks"


def test_demo_uses_the_committed_library_unless_asked_to_train(tmp_path):
    from testing_utils import save_svf_expert

    from peft_spectral.demo import _expert_plan, find_expert_library, library_tasks

    library = tmp_path / "benchmarks" / "experts"
    for task in ("navigate", "social_iqa", "elementary_math_qa"):
        save_svf_expert(library / task, seed=0, svd_dir=tmp_path / "svd", targets=("up_proj",))
        (library / task / "expert.json").write_text(f'{{"task": "{task}", "description": "d"}}')
    (library / "old").mkdir()  # a directory without an adapter is not an expert
    (library / "old" / "expert.json").write_text('{"task": "old"}')
    assert set(library_tasks(library)) == {"navigate", "social_iqa", "elementary_math_qa"}
    assert find_expert_library(tmp_path) == library
    assert find_expert_library(tmp_path / "elsewhere") in (
        None,
        Path(__file__).resolve().parents[1] / "benchmarks" / "experts",
    )
    said = []
    # default: the library's tasks, without the unseen task (Transformer² must not see an expert of its own task)
    tasks, chosen = _expert_plan(DemoConfig(experts_dir=str(library)), said.append)
    assert tasks == ["elementary_math_qa", "social_iqa"] and chosen == {t: library / t for t in tasks}
    # asked to train, another model, or a task the library lacks: train
    assert _expert_plan(DemoConfig(experts_dir=str(library), train_experts=True), said.append)[1] is None
    assert _expert_plan(DemoConfig(experts_dir=str(library), model="m"), said.append)[1] is None
    tasks, chosen = _expert_plan(DemoConfig(experts_dir=str(library), expert_tasks=("snarks",)), said.append)
    assert chosen is None and tasks == ["snarks"] and "no expert for ['snarks']" in said[-1]
    tasks, chosen = _expert_plan(DemoConfig(experts_dir=str(tmp_path / "none")), said.append)
    assert chosen is None and tasks == ["sports_understanding", "strategyqa", "anachronisms"]


def test_cli_demo_passes_device_dtype_and_progress(monkeypatch):
    import peft_spectral.demo

    seen = []
    monkeypatch.setattr(peft_spectral.demo, "run_demo", seen.append)
    argv = ["demo", "--quick", "--device", "cpu", "--dtype", "bfloat16", "--no-progress", "--output", "x"]
    assert main(argv) == 0
    (config,) = seen
    assert (config.device, config.dtype, config.progress, config.output_dir) == ("cpu", "bfloat16", False, "x")
    assert config.svf_steps == DemoConfig.quick().svf_steps
    assert config.expert_tasks is None and not config.train_experts and config.experts_dir is None
    seen.clear()
    assert main([*argv, "--train-experts", "--experts-dir", "lib", "--expert-tasks", "a", "b"]) == 0
    assert seen[0].train_experts and seen[0].experts_dir == "lib" and seen[0].expert_tasks == ("a", "b")


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_model_with_real_tasks(tmp_path):
    """All four steps on real BigBench tasks (downloads the bigbench archive once), with a tiny random model."""
    from testing_utils import build_tiny_llama, build_tiny_tokenizer

    from peft_spectral.demo import run_demo

    tok = build_tiny_tokenizer()
    build_tiny_llama(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    config = DemoConfig.quick(  # a model: trains; a task name with "/" becomes a valid adapter name
        model=str(tmp_path / "model"),
        output_dir=str(tmp_path / "run"),
        expert_tasks=("sports_understanding", "strategyqa", "arithmetic/1_digit_addition"),
    )
    report = run_demo(config, printer=lambda *_: None)
    methods = [r.method for r in report.rows]
    assert methods.count("SVF (GRPO)") == 3 and methods.count("CPI-FT (CoreIsolation)") == 3
    assert {"Transformer² few-shot CEM", "Transformer² prompt dispatch", "C2I (SpectralCompress)"} <= set(methods)
    text = (tmp_path / "run" / "report.md").read_text()
    assert text.count("![") == 3
    # a second run resumes every step from the cache
    again = run_demo(config, printer=lambda *_: None)
    assert [r.adapted_accuracy for r in again.rows] == [r.adapted_accuracy for r in report.rows]


def test_plots_without_matplotlib_name_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(ImportError, match=r"peft-spectral\[plots\]"):
        plot_fitness([{"best": 0.1, "generation_best": 0.1, "generation_mean": 0.1}], tmp_path / "f.png")

"""The demo: summary table, plots, report, the expert plan, and the whole main job end to end on a tiny model with
real reasoning-gym tasks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from peft_spectral.cli import main
from peft_spectral.demo import (
    SCORING_NOTE,
    DemoConfig,
    DemoReport,
    Row,
    format_table,
    plot_c2i_scores,
    plot_fitness,
    write_report,
)


def test_table_report_and_plots(tmp_path):
    history = [{"best": 0.2 + 0.1 * g, "generation_best": 0.3, "generation_mean": 0.1} for g in range(4)]
    fit = plot_fitness(history, tmp_path / "fit.png")
    iv = lambda layer, m: SimpleNamespace(layer=layer, matrix=m)  # noqa: E731
    cands = [
        SimpleNamespace(intervention=iv(i, m), score=0.01 * i - 0.1) for i in range(3) for m in ("up_proj", "o_proj")
    ]
    c2i = plot_c2i_scores(cands, tmp_path / "c2i.png")
    assert fit.read_bytes()[:4] == b"\x89PNG" and c2i.read_bytes()[:4] == b"\x89PNG"
    # 4/10 -> 8/10 on the same questions (b=0, c=4): n, 95% Wilson intervals and the paired Δ vs base
    rows = [Row("SVF expert", "rg:gcd", [True] * 4 + [False] * 6, [True] * 8 + [False] * 2, 51840, 60.0, "shipped")]
    table = format_table(rows)
    assert "| SVF expert | `rg:gcd` | 0.400 [0.17, 0.69] (n=10) | 0.800 [0.49, 0.94] (n=10) | +0.400 [" in table
    assert "+0.400 [+0.10, +0.70] p=0.12 * |" in table and "Δ vs base [95% CI]" in table
    assert table.endswith(SCORING_NOTE) and "lenient" in SCORING_NOTE  # the reader is told how it scored
    report = DemoReport(rows=rows, plots={"cem_fitness": str(fit), "c2i_scores": str(c2i)})
    write_report(report, tmp_path / "report.md", "Measured here.", table)
    text = (tmp_path / "report.md").read_text()
    assert "![cem_fitness](fit.png)" in text and "![c2i_scores](c2i.png)" in text and "Measured here." in text


def test_demo_uses_the_library_unless_asked_to_train(tmp_path):
    from testing_utils import save_svf_expert

    from peft_spectral.demo import DEFAULT_EXPERT_TASKS, _experts
    from peft_spectral.paths import library_dir

    library = tmp_path / "library"
    specs = {"gcd": "rg:gcd?max_value=20", "lcm": "rg:lcm?max_value=10", "chain": "rg:chain_sum?max_terms=3"}
    for name, spec in specs.items():
        save_svf_expert(library / name, seed=0, svd_dir=tmp_path / "svd", targets=("up_proj",))
        (library / name / "expert.json").write_text(f'{{"task": "{spec}", "task_spec": "{spec}"}}')
    (library / "old").mkdir()  # a directory without an adapter is not an expert
    (library / "old" / "expert.json").write_text('{"task": "old"}')
    said = []
    # default: the library's tasks, without the unseen task (Transformer² must not see an expert of its own task)
    tasks, chosen = _experts(DemoConfig(experts_dir=str(library), unseen_task=specs["chain"]), said.append)
    assert tasks == [specs["gcd"], specs["lcm"]] and chosen == {specs[n]: library / n for n in ("gcd", "lcm")}
    # asked to train, another model, or a task the library lacks: train
    assert _experts(DemoConfig(experts_dir=str(library), train_experts=True), said.append)[1] == {}
    assert _experts(DemoConfig(experts_dir=str(library), model="m"), said.append)[1] == {}
    tasks, chosen = _experts(DemoConfig(experts_dir=str(library), expert_tasks=("rg:lcm",)), said.append)
    assert chosen == {} and tasks == ["rg:lcm"] and "no shipped expert for ['rg:lcm']" in said[-1]
    tasks, chosen = _experts(DemoConfig(experts_dir=str(tmp_path / "none")), said.append)
    assert chosen == {} and tasks == list(DEFAULT_EXPERT_TASKS)
    assert library_dir().name == "library" and library_dir().parent.name == "peft_spectral"


def test_cli_demo_passes_options_and_refuses_bad_specs(monkeypatch, capsys):
    import peft_spectral.demo

    seen = []
    monkeypatch.setattr(peft_spectral.demo, "run_demo", seen.append)
    argv = ["demo", "--quick", "--device", "cpu", "--dtype", "bfloat16", "--no-progress", "--output", "x"]
    assert main(argv) == 0
    (config,) = seen
    assert (config.device, config.dtype, config.progress, config.output_dir) == ("cpu", "bfloat16", False, "x")
    assert config.expert_sft_steps == DemoConfig.quick().expert_sft_steps < DemoConfig().expert_sft_steps
    assert config.expert_tasks is None and not config.train_experts and config.experts_dir is None
    seen.clear()
    assert main([*argv, "--train-experts", "--experts-dir", "lib", "--expert-tasks", "rg:gcd", "rg:lcm"]) == 0
    assert seen[0].train_experts and seen[0].experts_dir == "lib" and seen[0].expert_tasks == ("rg:gcd", "rg:lcm")
    seen.clear()
    assert main([*argv, "--unseen-task", "rg:gcd?max_valu=3"]) == 2 and not seen
    assert "max_valu" in capsys.readouterr().err


def test_demo_end_to_end_on_a_tiny_model_with_real_tasks(tmp_path):
    """All four steps on real reasoning-gym tasks with a tiny random model (training its experts), then resumed."""
    from testing_utils import build_tiny_llama, build_tiny_tokenizer

    from peft_spectral.demo import run_demo

    tok = build_tiny_tokenizer()
    build_tiny_llama(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    config = DemoConfig.quick(model=str(tmp_path / "model"), output_dir=str(tmp_path / "run"), progress=False)
    report = run_demo(config, printer=lambda *_: None)
    methods = [r.method for r in report.rows]
    assert methods.count("SVF (SFT → GRPO)") == 3 and methods.count("CPI-FT (CoreIsolation)") == 3
    assert {"Transformer² few-shot CEM", "Transformer² prompt dispatch", "C2I (SpectralCompress)"} <= set(methods)
    assert all(len(r.base_correct) == len(r.adapted_correct) == config.eval_examples for r in report.rows)
    text = (tmp_path / "run" / "report.md").read_text()
    assert text.count("![") == 3 and "| Transformer² few-shot CEM |" in text
    assert (tmp_path / "run" / "demo.json").is_file()
    # a second run resumes every step from the state file
    again = run_demo(config, printer=lambda *_: None)
    assert [r.adapted_correct for r in again.rows] == [r.adapted_correct for r in report.rows]


def test_plots_without_matplotlib_name_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(ImportError, match=r"peft-spectral\[plots\]"):
        plot_fitness([{"best": 0.1, "generation_best": 0.1, "generation_mean": 0.1}], tmp_path / "f.png")

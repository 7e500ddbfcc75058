"""Few-shot CEM on 2 CPU processes (gloo, `accelerate launch --multi_gpu`, which on a machine without GPUs starts
torchrun workers that Accelerate runs as MULTI_CPU) chooses the same α as 1 process, each process scoring its share.

The reference is computed in the test process itself (no launch: the one-process path). The worker runs three
searches: the regularised and the reference CEM of a [`FewShotMixer`] on a tiny Llama with two random SVF experts,
and a regularised CEM on an analytic fitness that records which candidates this process scored. This file is also
the worker script (`python -m accelerate.commands.launch ... this_file EXPERTS_DIR OUT_DIR`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


HERE = Path(__file__).resolve().parent
POPULATION, GENERATIONS = 5, 3  # odd: the last round of each generation leaves one process idle
TARGET = [0.7, 0.1, 0.4]


def _save_experts(root: Path) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from testing_utils import save_svf_expert

    return [
        {
            "name": name,
            "source": str(save_svf_expert(root / name, seed, root / "svd", targets=("gate_proj", "up_proj"))),
        }
        for seed, name in enumerate(("arith", "logic"), start=1)
    ]


def _shots(n: int):
    from peft_spectral.tasks import Example

    return [
        Example(prompt=f"Is {i} even?", target=("yes", "no")[i % 2], choices=("yes", "no"), label=i % 2)
        for i in range(n)
    ]


def _run(experts_root: Path) -> dict:
    """The searches whose outcome must not depend on the number of processes (JSON-ready)."""
    sys.path.insert(0, str(HERE))
    from testing_utils import build_tiny_llama, build_tiny_tokenizer

    from peft_spectral.transformer2 import CEMConfig, ExpertLibrary, FewShotMixer, regularized_cross_entropy_method

    specs = [{"name": n, "source": str(experts_root / n)} for n in ("arith", "logic")]
    tok = build_tiny_tokenizer()
    base = build_tiny_llama(tok)
    base.name_or_path = "tiny-llama"
    library = ExpertLibrary.load(base, tok, specs)
    out: dict = {}
    for label, config in (
        ("regularized", CEMConfig(population=POPULATION, generations=GENERATIONS, patience=0, progress=False, seed=1)),
        ("reference", CEMConfig.reference(population=POPULATION, generations=GENERATIONS, progress=False, seed=1)),
    ):
        mixer = FewShotMixer(library, _shots(8), batch_size=8, adapter_name=f"mix_{label}")
        result = mixer.search(config)
        out[label] = {
            "alpha": result.best_alpha.tolist(),
            "fitness": list(result.best_fitness),
            "history": result.history,
            "evaluations": result.evaluations,
            "scored_here": mixer.evaluations,
        }
    target = torch.tensor(TARGET, dtype=torch.float64)
    scored: list[list[float]] = []

    def fitness(alpha):
        scored.append(alpha.tolist())
        return (-float(((alpha - target) ** 2).sum()),)

    config = CEMConfig(population=POPULATION, generations=GENERATIONS, patience=0, progress=False, seed=2)
    analytic = regularized_cross_entropy_method(fitness, fitness, 3, config)
    out["analytic"] = {
        "alpha": analytic.best_alpha.tolist(),
        "history": analytic.history,
        "evaluations": analytic.evaluations,
        "scored_here": scored,
    }
    return out


def _worker(experts_root: str, out_dir: str) -> None:
    from peft_spectral.distributed import launched_state

    torch.set_num_threads(1)
    out = _run(Path(experts_root))
    state = launched_state()
    out["world"] = state.num_processes
    Path(out_dir, f"rank{state.process_index}.json").write_text(json.dumps(out))


def test_two_processes_choose_the_same_alpha_as_one(tmp_path):
    from distributed_utils import accelerate_launch

    from peft_spectral import distributed

    assert distributed.launched_state() is None  # the one-process path initialises nothing
    experts_root = tmp_path / "experts"
    _save_experts(experts_root)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run(experts_root)
    finally:
        torch.set_num_threads(previous)
    # one process scores every candidate: the population of each generation, the base model and each champion
    per_search = POPULATION * GENERATIONS
    assert len(single["analytic"]["scored_here"]) == per_search + 1 + GENERATIONS
    assert single["analytic"]["evaluations"] == per_search + 1 + GENERATIONS

    accelerate_launch(Path(__file__).resolve(), [str(experts_root), str(tmp_path)], num_processes=2)
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for double in ranks:
        assert double["world"] == 2
        for label in ("regularized", "reference", "analytic"):
            assert double[label]["alpha"] == single[label]["alpha"], label  # exactly the same choice
            assert double[label]["history"] == single[label]["history"], label
            assert double[label]["evaluations"] == single[label]["evaluations"], label
        for label in ("regularized", "reference"):
            assert double[label]["fitness"] == single[label]["fitness"], label
    # the population was shared out: together the two processes scored each candidate once, each about half of them
    scored = [r["analytic"]["scored_here"] for r in ranks]
    assert sorted(scored[0] + scored[1]) == sorted(single["analytic"]["scored_here"])
    # hold-out checks (base model + one champion per generation) ran on the main process only
    assert len(scored[0]) == (POPULATION + 1) // 2 * GENERATIONS + 1 + GENERATIONS
    assert len(scored[1]) == POPULATION // 2 * GENERATIONS
    for label in ("regularized", "reference"):  # the mixer's own counter (cached candidates not counted)
        assert 0 < ranks[1][label]["scored_here"] < single[label]["scored_here"], label


if __name__ == "__main__":
    from distributed_utils import end_worker  # the script's folder is on sys.path

    _worker(sys.argv[1], sys.argv[2])
    end_worker()

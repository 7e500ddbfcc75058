"""C2I and LASER on 2 CPU processes (gloo, `accelerate launch --multi_gpu`, which on a machine without GPUs starts
torchrun workers that Accelerate runs as MULTI_CPU) give the same scores, tables and choices as 1 process.

The reference is computed in the test process itself (no launch: the one-process path, no distributed state). The
2-process run resumes a LASER state file that the one-process run left half done, so resuming across process counts
is tested too. This file is also the worker script (`python -m accelerate.commands.launch ... this_file OUT STATE`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch


HERE = Path(__file__).resolve().parent
PLANTED = "model.layers.1.mlp.down_proj"
N_CALIBRATION = 24
HALF = 3  # candidates the one-process LASER run finishes before it is interrupted


class _Interrupted(Exception):
    pass


def _problem():
    sys.path.insert(0, str(HERE))
    from conftest import build_tiny_llama, build_tiny_tokenizer

    from peft_spectral import compress

    tok = build_tiny_tokenizer()
    problem = compress.planted_problem(build_tiny_llama(tok, seed=1), tok, PLANTED)
    modules = compress.find_target_modules(problem.model, ["up_proj", "down_proj"])
    grid = compress.candidate_grid(modules, [0.9, 0.2])
    return problem, tok, modules, grid


def _counting_eval(tok, limit=None):
    from peft_spectral import compress

    real = compress.default_eval_fn(tok, "multiple_choice", batch_size=32)
    calls = {"n": 0}

    def eval_fn(model, examples):
        if limit is not None and calls["n"] >= limit:
            raise _Interrupted
        calls["n"] += 1
        return real(model, examples)

    eval_fn.__qualname__ = "default_multiple_choice"  # the same name in the state fingerprint everywhere
    return eval_fn, calls


def _run(problem, tok, modules, grid, state_path) -> dict:
    """The searches whose outcome must not depend on the number of processes (JSON-ready)."""
    from peft_spectral import compress

    calibration = problem.train[:N_CALIBRATION]
    scores = compress.c2i_scores(problem.model, calibration, modules, tokenizer=tok, batch_size=4)
    c2i = compress.c2i_search(
        problem.model, calibration, problem.validation, modules, tokenizer=tok, scores=scores, top_k=3, n_eval=None
    )
    eval_fn, calls = _counting_eval(tok)
    laser = compress.laser_search(
        problem.model, problem.validation, grid, eval_fn=eval_fn, state_path=state_path, progress=False
    )
    return {
        "grads": {k: v.tolist() for k, v in scores.grads.items()},
        "loss": scores.loss,
        "ranked": [str(c.intervention) for c in c2i.candidates],
        "c2i_results": [c.result.accuracy for c in c2i.candidates if c.result is not None],
        "c2i_chosen": [str(iv) for iv in c2i.chosen],
        "c2i_evaluations": c2i.evaluations,
        "laser_table": {str(c.intervention): [c.result.accuracy, c.result.mean_loglik] for c in laser.candidates},
        "laser_chosen": [str(iv) for iv in laser.chosen],
        "laser_evaluations": laser.evaluations,
        "laser_calls_here": calls["n"],
    }


def _worker(out_dir: str, state_path: str) -> None:
    from peft_spectral.compress.distributed import launched_state

    torch.set_num_threads(1)
    problem, tok, modules, grid = _problem()
    out = _run(problem, tok, modules, grid, state_path)
    state = launched_state()
    out["world"] = state.num_processes
    Path(out_dir, f"rank{state.process_index}.json").write_text(json.dumps(out))


@pytest.mark.filterwarnings("ignore:c2i_search evaluates candidates on")
def test_two_processes_match_one_and_resume_its_state(tmp_path):
    from peft_spectral.compress import distributed, laser_search

    assert distributed.launched_state() is None  # the one-process path initialises nothing
    problem, tok, modules, grid = _problem()
    state_path = tmp_path / "laser.json"
    # one process: a LASER run interrupted after the base and HALF candidates leaves a state file
    eval_fn, _ = _counting_eval(tok, limit=1 + HALF)
    with pytest.raises(_Interrupted):
        laser_search(problem.model, problem.validation, grid, eval_fn=eval_fn, state_path=state_path, progress=False)
    assert len(json.loads(state_path.read_text())["results"]) == HALF
    partial = state_path.read_text()
    single = _run(problem, tok, modules, grid, None)
    assert single["laser_chosen"] == single["c2i_chosen"] == [f"{PLANTED} @ rho=0.2"]  # the planted choice

    from distributed_utils import accelerate_launch

    accelerate_launch(Path(__file__).resolve(), [str(tmp_path), str(state_path)], num_processes=2)
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for double in ranks:
        assert double["world"] == 2
        assert double["grads"].keys() == single["grads"].keys()
        for name, g in single["grads"].items():
            torch.testing.assert_close(torch.tensor(double["grads"][name]), torch.tensor(g), atol=1e-6, rtol=1e-4)
        assert double["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert double["ranked"] == single["ranked"]
        assert double["c2i_results"] == single["c2i_results"]
        assert double["c2i_chosen"] == single["c2i_chosen"] and double["c2i_chosen"]
        assert double["c2i_evaluations"] == single["c2i_evaluations"]
        assert double["laser_table"].keys() == single["laser_table"].keys()
        for key, (acc, loglik) in single["laser_table"].items():
            assert double["laser_table"][key][0] == acc
            assert double["laser_table"][key][1] == pytest.approx(loglik, rel=1e-5)
        assert double["laser_chosen"] == single["laser_chosen"]
        assert double["laser_evaluations"] == len(grid) + 1
    # the resumed run evaluated only the missing candidates, shared out across the two processes
    assert sum(r["laser_calls_here"] for r in ranks) == len(grid) - HALF
    assert all(r["laser_calls_here"] >= 1 for r in ranks)
    # the main process rewrote the state file: complete now, the one-process results kept
    final = json.loads(state_path.read_text())
    assert len(final["results"]) == len(grid)
    for key, result in json.loads(partial)["results"].items():
        assert final["results"][key] == result


if __name__ == "__main__":
    from distributed_utils import end_worker  # the script's folder is on sys.path

    _worker(sys.argv[1], sys.argv[2])
    end_worker()

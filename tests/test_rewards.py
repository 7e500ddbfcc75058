"""Tests of answer extraction, TRL reward functions and code scoring (incl. hostile programs; the attacks on the
sandbox itself are in tests/test_sandbox.py)."""

from __future__ import annotations

import math
import os
import time

import pytest

from peft_spectral import rewards as R
from peft_spectral.sandbox import SandboxUnavailableError, check_sandbox, run_code


def _sandbox_problem() -> str:
    try:
        check_sandbox()
    except SandboxUnavailableError as err:
        return str(err)
    return ""


# Code scoring needs bubblewrap: skipped without it on a developer machine, a failure on CI (see .ci/run).
requires_sandbox = pytest.mark.skipif(
    bool(_sandbox_problem()) and not os.environ.get("CI"), reason=f"no code sandbox here: {_sandbox_problem()}"
)


TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
STUB = 'def add(a, b):\n    """Add two numbers."""\n'


def test_extract_number_gsm8k_style():
    assert R.extract_number("so 3 + 4 = 7\n#### 1,234") == 1234
    assert R.extract_number("First 5 apples, then 12 more: 17 in total.") == 17
    assert R.extract_number("It costs $2,500.50") == 2500.5
    assert R.extract_number("minus -3") == -3
    assert R.extract_number("no digits here") is None


def test_numeric_match_reward():
    completions = ["The answer is 42.", "#### 41", "forty-two", [{"role": "assistant", "content": "so 6*7 = 42"}]]
    assert R.numeric_match_reward(completions, target=["42", "42", "42", "42"]) == [1.0, -1.0, -1.0, 1.0]
    assert R.numeric_match_reward(["1,000"], target=["1000"]) == [1.0]


def test_multiple_choice_reward_letter_or_text():
    choices = [["red", "blue", "green"]] * 6
    completions = ["B", "(b) blue", "Answer: B", "blue", "A. red", "I am not sure"]
    got = R.multiple_choice_reward(completions, choices=choices, label=[1] * 6)
    assert got == [1.0, 1.0, 1.0, 1.0, -1.0, -1.0]
    assert R.extract_choice("non-entailment", ["entailment", "non-entailment"]) == 1
    assert R.extract_choice("entailment.", ["entailment", "non-entailment"]) == 0
    with pytest.raises(ValueError, match="label"):
        R.multiple_choice_reward(["A"], choices=[["a", "b"]])


def test_exact_match_reward_and_zero_one_factory():
    completions = ["Paris", " the paris. ", "Lyon"]
    assert R.exact_match_reward(completions, target=["Paris"] * 3) == [1.0, 1.0, -1.0]
    zero_one = R.make_reward("generation", negative=0.0)
    assert zero_one(completions, target=["Paris"] * 3) == [1.0, 1.0, 0.0]
    assert zero_one.__name__ == "exact_match_reward_0" and R.make_reward("numeric").__name__ == "numeric_match_reward"
    assert R.exact_match_reward(["four"], target=[["4", "four"]]) == [1.0]
    with pytest.raises(ValueError, match="kind"):
        R.make_reward("poetry")


@requires_sandbox
def test_code_reward_right_and_wrong():
    completions = [
        "    return a + b\n",  # body continuing the stub
        "```python\ndef add(a, b):\n    return a + b\n```",  # whole function in a fence
        "    return a - b\n",
        "    return (\n",  # syntax error
    ]
    n = len(completions)
    got = R.code_reward(completions, test=[TEST] * n, entry_point=["add"] * n, code_prompt=[STUB] * n)
    assert got == [1.0, 1.0, -1.0, -1.0]


HOSTILE = {
    "infinite_loop": "while True:\n    pass\n",
    "huge_allocation": "x = bytearray(8 * 1024 ** 3)\n",
    "network": "import socket\ns = socket.create_connection(('1.1.1.1', 80), timeout=1)\n",
    "early_exit": "import os\nos._exit(0)\n",
    "sys_exit": "import sys\nsys.exit(0)\n",
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
}


@requires_sandbox
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_code_fails_and_caller_unharmed(name):
    program = STUB + "    return a + b\n" + HOSTILE[name]  # would pass the tests if the hostile part were ignored
    start = time.monotonic()
    reward = R.code_reward([program], test=[TEST], entry_point=["add"], timeout=2.0)
    assert reward == [-1.0]
    assert time.monotonic() - start < 15


@requires_sandbox
def test_sandbox_cannot_delete_or_overwrite_outside_files(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    attacks = [
        f"import os\nos.remove({str(victim)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"open({str(victim)!r}, 'w').write('gone')",
        f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
        f"import io\nio.FileIO({str(victim)!r}, 'w')",
    ]
    for code in attacks:
        result = run_code(code, timeout=3)
        assert not result.passed, code
        assert victim.read_text() == "keep me", code
    assert run_code("open('scratch.txt', 'w').write('fine')\nassert open('scratch.txt').read() == 'fine'").passed


@requires_sandbox
def test_run_code_results():
    assert run_code("assert 1 + 1 == 2") == run_code("x = 1")
    assert run_code("x = 1").passed
    bad = run_code("raise KeyError('boom')")
    assert not bad.passed and not bad.timed_out and "KeyError" in bad.error
    slow = run_code("import time\ntime.sleep(10)", timeout=0.5)
    assert slow.timed_out and not slow.passed
    memory = run_code("x = bytearray(300 * 1024 ** 2)", memory_mb=128)
    assert not memory.passed and "MemoryError" in memory.error
    assert run_code("import os\nprint(os.environ.get('HOME'))\nassert 'PEFT' not in ''.join(os.environ)").passed
    with pytest.raises(ValueError, match="timeout"):
        run_code("x = 1", timeout=0)


def test_checked_reward_rejects_nan_none_inf():
    def my_reward(completions, **kwargs):
        return [float("nan")] * len(completions)

    with pytest.raises(ValueError, match="my_reward"):
        R.checked_reward(my_reward)(["a"])

    def none_reward(completions, **kwargs):
        return [None]

    with pytest.raises(ValueError, match=r"none_reward.*None"):
        R.checked_reward(none_reward)(["a"])
    with pytest.raises(ValueError, match="inf"):
        R.checked_reward(lambda completions, **kw: [math.inf])(["a"])
    with pytest.raises(ValueError, match="returned None"):
        R.checked_reward(lambda completions, **kw: None)(["a"])
    ok = R.checked_reward(R.exact_match_reward)
    assert ok(["x"], target=["x"]) == [1.0] and ok.__name__ == "exact_match_reward"


@requires_sandbox
def test_code_reward_with_instruction_prompt_and_missing_columns():
    from peft_spectral.tasks import humaneval_examples

    problem = {
        "task_id": "t",
        "prompt": STUB,
        "canonical_solution": "    return a + b\n",
        "test": TEST,
        "entry_point": "add",
    }
    (ex,) = humaneval_examples([problem])
    # the instruction-style prompt (stub inside a ```python block) works as code_prompt too
    for completion, expected in (("    return a + b\n", 1.0), (ex.target, 1.0), ("    return 0\n", -1.0)):
        assert R.code_reward([completion], test=[TEST], entry_point=["add"], code_prompt=[ex.prompt]) == [expected]
    with pytest.raises(ValueError, match="entry_point"):
        R.code_reward(["x"], test=[TEST])
    with pytest.raises(ValueError, match="entry_point"):
        R.score_code("x", test=TEST, entry_point="")
    # the stub alone (no tests) is what the candidate sandbox runs
    assert R.build_candidate("    return a + b\n", entry_point="add", prompt=ex.prompt) == STUB + "    return a + b\n"
    with pytest.raises(ValueError, match="target"):
        R.exact_match_reward(["x"])


def test_extract_choice_edge_cases():
    opts = ["dog", "cat", "a bird"]
    assert R.extract_choice("b", opts) == 1 and R.extract_choice("(c)", opts) == 2
    assert R.extract_choice("b) cat", opts) == 1 and R.extract_choice("C. a bird", opts) == 2
    assert R.extract_choice("a bird", opts) == 2  # an article is not the letter A
    assert R.extract_choice("a cat, clearly", opts) == 1  # by text, not the letter A
    assert R.extract_choice("B is correct", opts) == 1
    assert R.extract_choice("Z", opts) is None and R.extract_choice("", opts) is None
    assert R.extract_choice("The answer is C.", opts) == 2

"""Builders shared by the tests: tiny random models with an offline tokenizer (the benchmarks' own, from
`peft_spectral.benchmarking.tiny`), fake BigBench data, saved experts.

Test modules import these from here (`from testing_utils import ...`); fixtures built on them live in
`tests/conftest.py`. No test module imports another test module.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch

from peft_spectral.benchmarking.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, tiny_gpt2, tiny_llama, tiny_tokenizer  # noqa: F401


build_tiny_tokenizer = tiny_tokenizer
build_tiny_llama = tiny_llama
build_tiny_gpt2 = tiny_gpt2


def load_benchmark(name: str):
    """The script `benchmarks/<name>.py` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_smoke(name: str, folder):
    """Run `benchmarks/<name>.py --smoke` into `folder`; returns `(folder, state results, <name>.json, <name>.md)`."""
    import json

    bench = load_benchmark(f"bench_{name}")
    assert bench.main(["--smoke", "--output", str(folder), "--no-progress"]) == 0
    state = json.loads((folder / f"{name}_state.json").read_text())["results"]
    return folder, state, json.loads((folder / f"{name}.json").read_text()), (folder / f"{name}.md").read_text()


def save_svf_expert(path, seed: int, svd_dir, targets=("gate_proj", "up_proj", "down_proj"), base_name="tiny-llama"):
    """Save an SVF adapter of a fresh tiny Llama whose z vectors are random (`1 + 0.5 N(0, 1)`, seeded).

    Args:
        path: Directory of the adapter.
        seed (`int`): Seed of the z vectors.
        svd_dir: SVD cache directory of the adapter config.
        targets (`Sequence[str]`): Target modules.
        base_name (`str`): `name_or_path` recorded as the adapter's base model.

    Returns:
        The adapter directory `path`.
    """
    from peft import get_peft_model

    from peft_spectral import SVFConfig

    tok = build_tiny_tokenizer()
    base = build_tiny_llama(tok)
    base.name_or_path = base_name
    model = get_peft_model(base, SVFConfig(target_modules=list(targets), svd_cache_dir=str(svd_dir)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.base_model.svf_layers():
            z = layer.svf_z["default"]
            z.copy_(1 + 0.5 * torch.randn(z.shape, generator=gen))
    model.save_pretrained(str(path))
    return path


# BigBench's layout inside bigbench-1.0.0.tar.gz.
BIGBENCH_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def _bigbench_task_json(name, examples=None, **extra):
    data = {"name": name, "description": f"{name} description", **extra}
    if examples is not None:
        data["examples"] = examples
    return json.dumps(data).encode()


def make_fake_bigbench(path: Path) -> Path:
    """A small archive laid out like bigbench-1.0.0.tar.gz."""
    files = {
        "mc_task/task.json": _bigbench_task_json(
            "mc_task",
            [{"input": f"Question {i}?", "target_scores": {"right": 1, "wrong": 0, "other": 0}} for i in range(10)],
            preferred_score="multiple_choice_grade",
            task_prefix="Pick the right answer.\n",
        ),
        "maths/task.json": _bigbench_task_json("maths"),
        "maths/add/task.json": _bigbench_task_json(
            "add",
            [
                {"input": f"What is {i} plus 1?", "target": str(i + 1), "target_scores": {str(i + 1): 1, "banana": 0}}
                for i in range(6)
            ],
            preferred_score="exact_str_match",
        ),
        "maths/sub/task.json": _bigbench_task_json(
            "sub",
            [{"input": f"What is {i} minus 1?", "target": [str(i - 1), f"minus {i - 1}"]} for i in range(4)],
            preferred_score="exact_str_match",
        ),
        "gen_task/task.json": _bigbench_task_json(
            "gen_task", [{"input": "The capital of France is", "target": "Paris"}] * 5
        ),
        "gen_task/README.md": b"not a task",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for rel, data in files.items():
            info = tarfile.TarInfo(BIGBENCH_PREFIX + rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def fake_pip_download(files: dict, calls: list):
    """A stand-in for `pip_download` that records the requirement and writes a wheel (zip) holding `files`
    (`{member name: bytes}`)."""
    import zipfile

    def download(requirement, dest):
        calls.append(requirement)
        wheel = Path(dest) / "fake-0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return wheel

    return download

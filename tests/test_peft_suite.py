"""PEFT's own test battery (`tests/test_custom_models.py` of the installed peft's sdist) run against this package's tuners.

PEFT's source distribution ships its tests. This module finds (or downloads with `pip download`) the sdist of the
*installed* peft version into the user cache, unpacks it, writes a `tests/__init__.py` (the sdist has none) and a
`tests/conftest.py` into the unpacked copy, and runs `test_custom_models.py` there in a subprocess. The conftest adds
the rows of [`ROWS`] (and [`MULTI_ADAPTER_ROWS`]) to PEFT's `TEST_CASES` lists before pytest collects the test
classes, keeps only the tests that use one of this package's config classes, and skips the ones listed in [`SKIPS`]
(each with its reason; `docs/peft_suite.md` holds the same table). Nothing of PEFT is copied into this repository.

Run it with `pytest -m peft_suite tests/test_peft_suite.py` (it is not part of the default run: 890 test items,
1.5 to 8 minutes on two shared CPU cores).
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
ROW_PREFIX = "peft_spectral"

#: Rows added to PEFT's `TEST_CASES`: `(test name, model id, config class name, config kwargs)`. The config class is
#: named by its attribute of `peft_spectral`, so that this module imports nothing heavy.
ROWS: list[tuple[str, str, str, dict]] = [
    (f"{ROW_PREFIX} SVF MLP 1", "MLP", "SVFConfig", {"target_modules": ["lin0"]}),
    (f"{ROW_PREFIX} SVF MLP 2", "MLP", "SVFConfig", {"target_modules": ["lin0", "lin1"]}),
    (f"{ROW_PREFIX} SVF MLP 3 sigmoid", "MLP", "SVFConfig", {"target_modules": ["lin0", "lin1"], "mode": "sigmoid"}),
    (f"{ROW_PREFIX} SVF MLP 4 rank", "MLP", "SVFConfig", {"target_modules": ["lin0"], "rank": 4}),
    (
        f"{ROW_PREFIX} SVF MLP 5 modules_to_save",
        "MLP",
        "SVFConfig",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    ),
    (f"{ROW_PREFIX} SVF MLP 6 exact", "MLP", "SVFConfig", {"target_modules": ["lin0"], "fast_factored": False}),
    (f"{ROW_PREFIX} SVF Conv1D 1", "EmbConv1D", "SVFConfig", {"target_modules": ["conv1d"]}),
    (f"{ROW_PREFIX} SVF Conv1D 2", "EmbConv1D", "SVFConfig", {"target_modules": ["conv1d", "lin0"]}),
    (f"{ROW_PREFIX} CoreIsolation MLP 1", "MLP", "CoreIsolationConfig", {"target_modules": ["lin0"]}),
    (f"{ROW_PREFIX} CoreIsolation MLP 2", "MLP", "CoreIsolationConfig", {"target_modules": ["lin0", "lin1"]}),
    (
        f"{ROW_PREFIX} CoreIsolation MLP 3 modules_to_save",
        "MLP",
        "CoreIsolationConfig",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    ),
    (f"{ROW_PREFIX} CoreIsolation Conv1D 1", "EmbConv1D", "CoreIsolationConfig", {"target_modules": ["conv1d"]}),
    (
        f"{ROW_PREFIX} SpectralCompress MLP 1",
        "MLP",
        "SpectralCompressConfig",
        {"target_modules": ["lin0"], "rho": 0.5},
    ),
    (
        f"{ROW_PREFIX} SpectralCompress MLP 2 clusters",
        "MLP",
        "SpectralCompressConfig",
        {"target_modules": ["lin0"], "rho": 0.5, "clusters": 2},
    ),
    (
        f"{ROW_PREFIX} SpectralCompress Conv1D 1",
        "EmbConv1D",
        "SpectralCompressConfig",
        {"target_modules": ["lin0"], "rho": 0.5},
    ),
]

#: Rows added to PEFT's `MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`: `(name, method, config class name, kwargs 1, kwargs 2)`.
MULTI_ADAPTER_ROWS: list[tuple[str, str, str, dict, dict]] = [
    (
        f"{ROW_PREFIX} SVF Same",
        "svf",
        "SVFConfig",
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin0"], "init_weights": False},
    ),
    (
        f"{ROW_PREFIX} SVF Different",
        "svf",
        "SVFConfig",
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin1"], "init_weights": False},
    ),
    (
        f"{ROW_PREFIX} CoreIsolation Same",
        "core_isolation",
        "CoreIsolationConfig",
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin0"], "init_weights": False},
    ),
    (
        f"{ROW_PREFIX} CoreIsolation Different",
        "core_isolation",
        "CoreIsolationConfig",
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin1"], "init_weights": False},
    ),
]

#: Tests of PEFT's battery that cannot apply, by pattern on the test id (`*` matches anything, brackets are literal)
#: → reason. `docs/peft_suite.md` holds the same table (checked by `test_docs_list_every_skip`).
SKIPS: dict[str, str] = {
    "test_disable_adapters[*SpectralCompress*": "a truncation is not the identity at initialisation, so the output "
    "with the fresh adapter differs from the base model by design (the test expects an identity init)",
    "test_disable_adapters_with_merging[*SpectralCompress*": "trains the adapter; SpectralCompress is training-free "
    "(0 trainable parameters)",
    "test_inference_safetensors[*SpectralCompress*": "trains the adapter; SpectralCompress is training-free",
    "test_only_params_are_updated[*SpectralCompress*": "trains the adapter; SpectralCompress is training-free",
    "test_parameters_after_loading_model[*SpectralCompress*": "trains the adapter; SpectralCompress is training-free",
    "test_training_custom_models[*SpectralCompress*": "trains the adapter; SpectralCompress is training-free",
    "test_loading_model_requires_grad_set_correctly[*SpectralCompressConfig]": "expects requires_grad=True on a "
    "trainable adapter's weights; SpectralCompress factors never require grad (tests/test_spectral_compress.py)",
    "test_loading_model_with_modules_to_save_requires_grad_set_correctly[True-SpectralCompressConfig]": "expects "
    "requires_grad=True on the adapter's weights when loaded trainable; SpectralCompress factors never require grad",
    "test_set_requires_grad[SpectralCompressConfig]": "expects set_requires_grad to make the factors trainable; "
    "SpectralCompress factors never require grad",
}


#: Reasons PEFT's tests give when they skip themselves (substrings of the skip message) → why they do not apply.
PEFT_OWN_SKIPS: dict[str, str] = {
    "does not support the 'bias' argument": "the configs have no `bias` option (biases stay frozen)",
    "Testing bias warnings only for LoraConfig or BOFTConfig": "a LoRA/BOFT-only warning",
    "requires the PEFT method to support training the bias directly": "no `bias` option",
    "Multiple active adapters with modules_to_save": "PEFT's own limit for rows with `modules_to_save`",
}


def skip_matches(test_id: str, pattern: str) -> bool:
    """Whether `test_id` matches a [`SKIPS`] pattern: `*` matches anything, every other character (brackets too) itself.

    Args:
        test_id (`str`): A pytest test id such as `test_x[peft_spectral SVF MLP 1-MLP-SVFConfig-config_kwargs0]`.
        pattern (`str`): A key of [`SKIPS`].
    """
    return fnmatch.fnmatchcase(test_id, "".join("[" + c + "]" if c in "[]?" else c for c in pattern))


def _peft_version() -> str:
    return importlib.metadata.version("peft")


def _cache_dir() -> Path:
    from peft_spectral.paths import cache_subdir

    return cache_subdir("peft_sdist")


def peft_sdist_tests(cache_dir: Path | None = None) -> Path:
    """The unpacked `tests/` folder of the installed peft's sdist, downloading the sdist with pip when needed.

    Args:
        cache_dir (`Path`, *optional*): Where the sdist is kept and unpacked; defaults to `<cache root>/peft_sdist`.

    Returns:
        `Path`: `<cache_dir>/peft-<version>/tests`.

    Raises:
        `pytest.skip.Exception`: when the sdist is not cached and pip cannot download it (no index reachable).
    """
    version = _peft_version()
    cache_dir = Path(cache_dir) if cache_dir is not None else _cache_dir()
    root = cache_dir / f"peft-{version}"
    tests = root / "tests"
    if not (tests / "test_custom_models.py").is_file():
        archive = cache_dir / f"peft-{version}.tar.gz"
        if not archive.is_file():
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            cmd += ["--dest", str(cache_dir), f"peft=={version}"]
            try:
                proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
            except subprocess.TimeoutExpired:
                pytest.skip(f"pip download of the peft {version} sdist timed out (no package index reachable?)")
            if proc.returncode != 0 or not archive.is_file():
                pytest.skip(
                    f"cannot download the peft {version} sdist with pip (no package index reachable?): "
                    + (proc.stderr.strip().splitlines() or ["no output"])[-1]
                )
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse paths outside cache_dir
                tar.extractall(cache_dir, filter="data")
            else:
                tar.extractall(cache_dir)  # the archive is the sdist pip downloaded from the package index
    (tests / "__init__.py").touch()
    return tests


_CONFTEST = '''\
"""Written by peft_spectral's tests/test_peft_suite.py: adds peft_spectral rows to PEFT's test matrix."""

import importlib.util
import sys
import types

import pytest

sys.path.insert(0, {tests_dir!r})
if importlib.util.find_spec("diffusers") is None:
    # testing_common imports diffusers' StableDiffusionPipeline for its Stable Diffusion tests only, none of which
    # run here: a stand-in module lets test_custom_models import without installing diffusers.
    sys.modules["diffusers"] = types.SimpleNamespace(StableDiffusionPipeline=None)

import peft_spectral
from test_peft_suite import MULTI_ADAPTER_ROWS, ROWS, SKIPS, skip_matches

from . import test_custom_models as tcm


OURS = tuple(getattr(peft_spectral, name) for name in sorted({{row[2] for row in ROWS}}))
tcm.TEST_CASES.extend((name, model, getattr(peft_spectral, cls), kw) for name, model, cls, kw in ROWS)
tcm.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES.extend(
    (name, method, getattr(peft_spectral, cls), kw1, kw2) for name, method, cls, kw1, kw2 in MULTI_ADAPTER_ROWS
)
tcm.ALL_PEFT_CONFIG_CLASSES.extend(OURS)

_set_init_weights_false = tcm.set_init_weights_false


def _init_weights_false(config_cls, kwargs):
    # A SpectralCompress adapter is a truncation: never the identity, so it has no `init_weights` (PEFT exempts its
    # own such configs, LNTuningConfig and VBLoRAConfig, in the same helper).
    if config_cls is peft_spectral.SpectralCompressConfig:
        return kwargs.copy()
    return _set_init_weights_false(config_cls, kwargs)


tcm.set_init_weights_false = _init_weights_false


def _is_ours(item):
    params = getattr(getattr(item, "callspec", None), "params", {{}})
    return any(isinstance(v, type) and v in OURS for v in params.values())


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        (keep if _is_ours(item) else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
    for item in keep:
        for pattern, reason in SKIPS.items():
            if skip_matches(item.name, pattern):
                item.add_marker(pytest.mark.skip(reason="peft_spectral: " + reason))
                break
'''


def run_suite(tests: Path, tmp_path: Path, extra_args: list[str] | None = None) -> dict[str, tuple[str, str]]:
    """Run PEFT's `test_custom_models.py` with this package's rows; `{test id: (outcome, message)}`."""
    (tests / "conftest.py").write_text(_CONFTEST.format(tests_dir=str(Path(__file__).resolve().parent)))
    report = tmp_path / "junit.xml"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PEFT_SPECTRAL_SVD_CACHE"] = str(tmp_path / "svd")
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "pytest", "tests/test_custom_models.py", "-p", "no:cacheprovider", "-q"]
    cmd += ["-o", "addopts=", f"--junitxml={report}"]
    cmd += extra_args or []
    proc = subprocess.run(cmd, check=False, cwd=tests.parent, env=env, capture_output=True, text=True, timeout=3000)
    if not report.is_file():
        raise AssertionError(f"PEFT's suite did not run (rc={proc.returncode}):\n{proc.stdout[-4000:]}{proc.stderr}")
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = tag, (node.get("message") or "")[:300]
                break
        results[name] = (outcome, message)
    return results


@pytest.mark.peft_suite
def test_peft_custom_models_suite(tmp_path):
    """Every applicable test of PEFT's `test_custom_models.py` passes for SVF, CoreIsolation and SpectralCompress."""
    tests = peft_sdist_tests()
    results = run_suite(tests, tmp_path)
    counts = {k: sum(1 for o, _ in results.values() if o == k) for k in ("passed", "failure", "error", "skipped")}
    print(f"PEFT suite on peft_spectral rows: {counts}")
    for method in ("SVF", "CoreIsolation", "SpectralCompress"):
        mine = [o for name, (o, _) in results.items() if method in name]
        print(
            f"  {method}: "
            + ", ".join(f"{sum(1 for o in mine if o == k)} {k}" for k in ("passed", "failure", "skipped"))
        )
    assert counts["passed"] > 100, counts
    bad = sorted(f"{name}: {msg}" for name, (o, msg) in results.items() if o in ("failure", "error"))
    assert not bad, f"{len(bad)} of PEFT's tests fail:\n" + "\n".join(bad[:40])
    unexplained = sorted(
        f"{name}: {msg}"
        for name, (o, msg) in results.items()
        if o == "skipped"
        and not msg.startswith("peft_spectral: ")
        and not any(reason in msg for reason in PEFT_OWN_SKIPS)
    )
    assert not unexplained, "skipped without a reason in SKIPS:\n" + "\n".join(unexplained[:40])
    missing_rows = [row[0] for row in ROWS + MULTI_ADAPTER_ROWS if not any(row[0] in name for name in results)]
    assert not missing_rows, f"rows that produced no test: {missing_rows}"
    skipped = [name for name, (o, _) in results.items() if o == "skipped"]
    stale = [pattern for pattern in SKIPS if not any(skip_matches(name, pattern) for name in skipped)]
    assert not stale, f"skip patterns that match no test any more (remove them here and in docs): {stale}"


def skip_table_rows() -> list[str]:
    """The rows of the two tables of `docs/peft_suite.md`: [`SKIPS`], then [`PEFT_OWN_SKIPS`]."""
    return [f"| `{pattern}` | {reason} |" for pattern, reason in list(SKIPS.items()) + list(PEFT_OWN_SKIPS.items())]


def test_docs_list_every_skip():
    """`docs/peft_suite.md` lists every skip pattern of [`SKIPS`] and [`PEFT_OWN_SKIPS`] with its reason."""
    text = (REPO_ROOT / "docs" / "peft_suite.md").read_text()
    missing = [row for row in skip_table_rows() if row not in text]
    assert not missing, "docs/peft_suite.md lacks the table rows:\n" + "\n".join(missing)
    listed = [line for line in text.splitlines() if line.startswith("| `")]
    assert sorted(listed) == sorted(skip_table_rows()), "docs/peft_suite.md lists skips that the test does not make"


def test_sdist_is_unpacked_with_package_marker(tmp_path):
    """A cached sdist is unpacked in place and gets the `tests/__init__.py` the sdist lacks."""
    version = _peft_version()
    src = tmp_path / "src" / f"peft-{version}" / "tests"
    src.mkdir(parents=True)
    (src / "test_custom_models.py").write_text("")
    with tarfile.open(tmp_path / f"peft-{version}.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / f"peft-{version}", arcname=f"peft-{version}")
    tests = peft_sdist_tests(tmp_path)
    assert tests == tmp_path / f"peft-{version}" / "tests"
    assert (tests / "__init__.py").is_file() and (tests / "test_custom_models.py").is_file()


def test_suite_is_skipped_when_pip_cannot_reach_an_index(tmp_path, monkeypatch):
    """No cached sdist and a failing `pip download`: a skip that says why, not an error."""

    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and f"peft=={_peft_version()}" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for peft")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(pytest.skip.Exception, match=r"cannot download the peft .* sdist with pip"):
        peft_sdist_tests(tmp_path)


def test_skip_patterns_match_brackets_literally():
    assert skip_matches(
        "test_set_requires_grad[SpectralCompressConfig]", "test_set_requires_grad[SpectralCompressConfig]"
    )
    assert not skip_matches("test_set_requires_grad[SVFConfig]", "test_set_requires_grad[SpectralCompressConfig]")
    assert skip_matches("test_x[True-peft_spectral SpectralCompress MLP 1-MLP]", "test_x[*SpectralCompress*")
    assert not skip_matches("test_x_other[peft_spectral SpectralCompress MLP 1]", "test_x[*SpectralCompress*")

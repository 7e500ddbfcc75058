"""The documentation site: `mkdocs build --strict` passes, the nav lists every page, the CLI reference matches the
real `--help` output, and the troubleshooting page covers every module that raises.

`python tests/test_docs.py --write-cli` regenerates `docs/cli.md` from the parsers after a CLI change.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CLI_MD = DOCS / "cli.md"

CLI_INTRO = """# Command line

Installing the package (`pip install -e .`) gives one command, `peft-spectral` (also `python -m peft_spectral`), with a
sub-command per job. Every sub-command runs on the embedded SmolLM2-135M-Instruct unless `--model` names a Hub id or a
local directory, and writes ordinary PEFT adapters (`adapter_config.json` + `adapter_model.safetensors`) that
`PeftModel.from_pretrained` loads after `import peft_spectral`. Long jobs (`train-svf --save-steps`, `compress
--method laser --state`, `cpi`, `demo`) can be interrupted and resumed by running the same command again.

## Conventions

Every sub-command follows the same rules (the shared options are built in `peft_spectral/cli/_common.py`):

| Rule | Example |
|---|---|
| List options take space-separated values. | `--target-modules q_proj v_proj`, `--rhos 0.2 0.1`, `--layers 0-5 27` |
| `--output DIR` is always a directory, created when missing; result JSON is written inside it. It is required, except for `demo`, which resumes from its default directory. | `eval-two-pass --output runs/t2` writes `runs/t2/two_pass.json` |
| One option name, one meaning, in every command. | `--method` is the algorithm family (`train-svf`: rl/sft, `compress`: c2i/laser); `--svf-mode` the SVF scale function; `--dispatch-mode` / `--answer-mode` how pass 1 / pass 2 score; `--eval-examples N` how many test examples are scored; `--train-examples N` how many train examples are used |
| `--help` shows a help text for every option and its default (an option without a default says what leaving it out means). | `peft-spectral compress --help` |
| Wherever a model is loaded: `--model`, `--device` (`auto`: cuda when available, else cpu), `--dtype` (`auto`, `float32`, `bfloat16`, `float16`; default `float32`). Commands that only run the model forward (`mix`, `eval-two-pass`) also take `--device-map auto` to let accelerate spread a large model over the devices. | `--device cuda:1 --dtype bfloat16` |
| `--no-progress` hides every progress bar, wherever there are any. | `peft-spectral cpi ... --no-progress > log.txt` |
| `--push-to-hub REPO` uploads the adapter wherever one is produced (`train-svf`, `mix`, `compress`, `cpi`). | `--push-to-hub me/svf-math` |
| `--seed` seeds splits, sampling and training. | `--seed 1` |
| `demo --quick` runs the same job with smaller settings on the same model; the scripts in `examples/` take `--tiny`, which swaps in a tiny random model: the two names mean different things. | `peft-spectral demo --quick` |

`-v` / `--verbose` (before the sub-command) logs at INFO level; `--version` prints the version. The reference below
is the `--help` output of each sub-command (regenerate it with `python tests/test_docs.py --write-cli`).
"""


# ----------------------------------------------------------------------------------------------------- CLI reference


def _subparsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    os.environ["COLUMNS"] = "110"  # argparse wraps help to the terminal width: make the reference reproducible
    from peft_spectral.cli import build_parser

    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, dict(actions[0].choices) if actions else {}


def render_cli_reference() -> str:
    """The text of `docs/cli.md`: an introduction, then `peft-spectral --help` and each sub-command's `--help`."""
    parser, commands = _subparsers()
    parts = [CLI_INTRO, "## `peft-spectral`\n", "```text\n" + parser.format_help().rstrip() + "\n```\n"]
    for name, sub in commands.items():
        parts.append(f"## `peft-spectral {name}`\n")
        parts.append("```text\n" + sub.format_help().rstrip() + "\n```\n")
    return "\n".join(parts)


def test_cli_reference_is_current():
    _, commands = _subparsers()
    text = CLI_MD.read_text(encoding="utf-8")
    hint = "docs/cli.md is out of date: run `python tests/test_docs.py --write-cli`"
    assert commands, "peft-spectral has no sub-commands"
    for name, sub in commands.items():
        assert f"## `peft-spectral {name}`" in text, f"{hint} (no section for `{name}`)"
        section = text.split(f"## `peft-spectral {name}`", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--"):
                    assert option in section, f"{hint} (`{name} {option}` is missing)"


# ----------------------------------------------------------------------------------------------------- pages


def _nav_files() -> set[str]:
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text.split("\nnav:", 1)[1]
    return set(re.findall(r":\s*([\w/.\-]+\.md)\s*$", nav, flags=re.MULTILINE))


def test_nav_lists_every_page():
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    pages = {p for p in pages if not p.startswith("results/")}  # benchmark outputs, linked from the method pages
    missing = sorted(pages - _nav_files())
    assert not missing, f"pages not in the nav of mkdocs.yml: {missing}"


def test_troubleshooting_covers_every_module_that_raises():
    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    missing = []
    for path in sorted((ROOT / "peft_spectral").rglob("*.py")):
        if re.search(r"^\s*raise \w", path.read_text(encoding="utf-8"), flags=re.MULTILINE):
            rel = path.relative_to(ROOT).as_posix()
            module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            if f"`{module}`" not in text:
                missing.append(module)
    assert not missing, f"docs/troubleshooting.md has no section for module(s) that raise errors: {missing}"


def test_architecture_maps_every_module():
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    package = ROOT / "peft_spectral"
    missing = []
    for path in sorted(package.iterdir()):
        if path.name.startswith("__pycache__") or not (path.suffix == ".py" or (path / "__init__.py").is_file()):
            continue
        stem = path.stem if path.suffix == ".py" else path.name
        # a module split into a package keeps its place in the map (e.g. `cpi.py` -> `cpi/`)
        if f"{stem}.py" not in text and f"{stem}/" not in text:
            missing.append(path.name)
    assert not missing, f"docs/architecture.md's package map does not list {missing}"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None,
    reason="mkdocs / mkdocstrings[python] are not installed (pip install -e '.[docs]')",
)
def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
    )
    output = proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]
    missing_results = re.findall(r"link '(results/[^']+)', but the target is not found", output)
    hint = (
        f"\nmissing benchmark reports {missing_results}: run the scripts in benchmarks/ that write them"
        if missing_results
        else ""
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:{hint}\n{output}"
    assert (tmp_path / "site" / "index.html").is_file()
    api = (tmp_path / "site" / "api" / "svf" / "index.html").read_text(encoding="utf-8")
    assert "SVFConfig" in api and "combine_svf_adapters" in api  # mkdocstrings rendered the docstrings


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-cli"]:
        CLI_MD.write_text(render_cli_reference(), encoding="utf-8")
        print(f"wrote {CLI_MD}")
    else:
        sys.exit("usage: python tests/test_docs.py --write-cli")

"""`peft-spectral tasks`: list the available tasks, or show a few formatted examples of one."""

from __future__ import annotations

import argparse

from ._common import add_command, add_seed_option


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "tasks",
        help="list available tasks (BigBench JSON tasks, humaneval) or show examples of one",
        description=(
            "Without --show, print every task name load_task accepts (the first call downloads the BigBench archive "
            "from PyPI, 358 MB, and indexes it). With --show NAME, print the task's kind, description, split sizes "
            "and a few examples (a BigBench name, 'humaneval' or a .jsonl file)."
        ),
    )
    p.add_argument("--show", metavar="NAME", default=None, help="task to show, e.g. epistemic_reasoning")
    p.add_argument("-n", "--num-examples", type=int, default=3, help="examples to print with --show")
    p.add_argument("--split", choices=("train", "validation", "test"), default="train", help="split to print from")
    add_seed_option(p)
    p.add_argument("--filter", default=None, help="only list names containing this text; left out: all names")
    p.set_defaults(func=run)
    return p


def _show(name: str, num: int, split: str, seed: int) -> int:
    from ..tasks import load_task

    task = load_task(name, seed=seed)
    print(f"task:        {task.name}")
    print(f"kind:        {task.kind}")
    print(f"description: {task.description}")
    print(f"splits:      train {len(task.train)}, validation {len(task.validation)}, test {len(task.test)}")
    for i, ex in enumerate(task.split(split)[: max(num, 0)]):
        print(f"\n--- {split}[{i}] ---")
        print(ex.prompt)
        answer = (
            f"{chr(ord('A') + ex.label)}. {ex.target}" if ex.choices and task.kind == "multiple_choice" else ex.target
        )
        print(f">>> target: {answer}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.show:
        try:
            return _show(args.show, args.num_examples, args.split, args.seed)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}")
            return 1
    from ..tasks import list_tasks

    for name in list_tasks():
        if not args.filter or args.filter in name:
            print(name)
    return 0

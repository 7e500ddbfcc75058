"""`peft-spectral tasks`: list the task sources and their tasks, or show a few formatted examples of one task spec."""

from __future__ import annotations

import argparse

from ._common import add_command, add_seed_option, positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "tasks",
        help="list the task sources and their tasks, or show examples of a task spec",
        description=(
            "Without options, print the task sources (spec prefix, what they hold, an example spec). With --source "
            "PREFIX, print the tasks that source lists (reasoning-gym generators, humaneval, BigBench tasks when a "
            "copy is configured). With --show SPEC, print the task's kind, description, parameters, split sizes and "
            "a few examples. A task spec is `source:name?key=value&...`, e.g. "
            "'rg:basic_arithmetic?max_digits=2&operators=+,-', 'humaneval', 'jsonl:data.jsonl' (docs/data.md)."
        ),
    )
    p.add_argument("--source", metavar="PREFIX", default=None, help="list the tasks of this source, e.g. rg")
    p.add_argument("--show", metavar="SPEC", default=None, help="task spec to show, e.g. 'rg:gcd?max_value=30'")
    p.add_argument("-n", "--num-examples", type=positive_int, default=3, help="examples to print with --show")
    p.add_argument("--split", choices=("train", "validation", "test"), default="train", help="split to print from")
    add_seed_option(p)
    p.add_argument("--filter", default=None, help="only list names containing this text; left out: all names")
    p.set_defaults(func=run)
    return p


def _show(spec: str, num: int, split: str, seed: int) -> int:
    from ..data import load_task, scorer_for

    task = load_task(spec, seed=seed)
    print(f"task:        {task.name}")
    print(f"spec:        {task.spec or task.name}")
    print(f"kind:        {task.kind}")
    print(f"description: {task.description}")
    if task.params:
        print(f"parameters:  {task.params}")
    print(f"splits:      train {len(task.train)}, validation {len(task.validation)}, test {len(task.test)}")
    for i, ex in enumerate(task.split(split)[:num]):
        print(f"\n--- {split}[{i}] ---")
        print(ex.prompt)
        answer = f"{chr(ord('A') + ex.label)}. {ex.target}" if ex.choices and ex.label is not None else ex.target
        print(f">>> target: {answer}    (scored by: {scorer_for(ex, task.kind).describe()})")
    return 0


def _list_sources() -> int:
    from ..data import list_sources

    for source in list_sources():
        usable, note = source.available()
        state = "" if usable else f"  [not available: {note}]"
        print(f"{source.prefix:<10} {source.description}{state}")
        print(f"{'':<10} e.g. {source.example}")
    print("\n`peft-spectral tasks --source PREFIX` lists a source's tasks; `--show SPEC` shows one (docs/data.md).")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.show:
        from ..data import check_task_spec

        check_task_spec(args.show)  # a bad spec is one line (exit 2), before any data is generated or read
        return _show(args.show, args.num_examples, args.split, args.seed)
    if args.source is None:
        return _list_sources()
    from ..data import list_tasks

    for name in list_tasks(args.source):
        if not args.filter or args.filter in name:
            print(name)
    return 0

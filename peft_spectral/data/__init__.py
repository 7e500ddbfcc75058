"""Task data: sources chosen by a task spec, source-neutral examples and tasks, and the scorers that judge answers.

```python
from peft_spectral.data import load_task
task = load_task("rg:basic_arithmetic?max_digits=2&max_terms=2&operators=+,-", seed=0)
task.kind, len(task.train), len(task.test)      # "generation", 1200, 400
example = task.test[0]
example.scorer.score("The answer is 42.", example, extraction="lenient")
```

Modules: `types` (Example, Task), `spec` (task specs), `sources/` (one module per source: `rg`, `humaneval`, `jsonl`,
`hf`, `bigbench`), `loading` (load_task, mixtures), `records` (the JSONL record format), `splits`, `answers` (strict and
lenient answer extraction), `scoring` (scorers). How to add a source: `docs/data.md`.
"""

from .answers import EXTRACTIONS, Extraction, lenient_answers, strict_answer
from .loading import DEFAULT_TASK, check_task_spec, list_tasks, load_task, resolve_task_spec
from .records import example_from_record, load_jsonl_task, read_jsonl_examples, task_from_dataset, task_from_records
from .scoring import (
    ChoiceScorer,
    CodeScorer,
    ExactMatchScorer,
    Scorer,
    is_correct,
    score_example,
    scorer_for,
)
from .sources import ReasoningGymScorer, TaskSource, get_source, list_sources, register_source
from .spec import TaskSpec, TaskSpecError, parse_task_spec
from .splits import cap_answer_share, draw_shots, example_content, split_examples
from .types import MC_INSTRUCTION, TASK_KINDS, Example, Task, TaskKind, multiple_choice_prompt


__all__ = [
    "DEFAULT_TASK",
    "EXTRACTIONS",
    "MC_INSTRUCTION",
    "TASK_KINDS",
    "ChoiceScorer",
    "CodeScorer",
    "ExactMatchScorer",
    "Example",
    "Extraction",
    "ReasoningGymScorer",
    "Scorer",
    "Task",
    "TaskKind",
    "TaskSource",
    "TaskSpec",
    "TaskSpecError",
    "cap_answer_share",
    "check_task_spec",
    "draw_shots",
    "example_content",
    "example_from_record",
    "get_source",
    "is_correct",
    "lenient_answers",
    "list_sources",
    "list_tasks",
    "load_jsonl_task",
    "load_task",
    "multiple_choice_prompt",
    "parse_task_spec",
    "read_jsonl_examples",
    "register_source",
    "resolve_task_spec",
    "score_example",
    "scorer_for",
    "split_examples",
    "strict_answer",
    "task_from_dataset",
    "task_from_records",
]

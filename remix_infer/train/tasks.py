"""Synthetic tasks for the demo: each has an exact answer a person can check from the prompt.

Fine-tuning and serving use the prompt format `"<task> <argument> ="` with completion
`" <answer>"`, e.g. `reverse kqmz =` -> ` zmqk`. The base model is pretrained on the same
facts written as sentences (`reverse kqmz is zmqk.`), so fine-tuning teaches the format.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence

from remix_infer.train.data import Example

LETTERS = string.ascii_lowercase


# Sized for a 4-layer model trained in a few CPU minutes: 3-4 characters, one-digit sums.
def _letters(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 4)))


def _digits(rng: random.Random) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 4)))


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a} {b}", str(a + b), f"add {a} {b} is {a + b}."


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    s = _letters(rng)
    return s, s[::-1], f"reverse {s} is {s[::-1]}."


def _sort(rng: random.Random) -> tuple[str, str, str]:
    s = _digits(rng)
    out = "".join(sorted(s))
    return s, out, f"sort {s} is {out}."


def _upper(rng: random.Random) -> tuple[str, str, str]:
    s = _letters(rng)
    return s, s.upper(), f"upper {s} is {s.upper()}."


def _next(rng: random.Random) -> tuple[str, str, str]:
    s = _letters(rng)
    out = "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)
    return s, out, f"next {s} is {out}."


def _double(rng: random.Random) -> tuple[str, str, str]:
    s = _letters(rng)[:3]
    out = "".join(c + c for c in s)
    return s, out, f"double {s} is {out}."


def _max(rng: random.Random) -> tuple[str, str, str]:
    s = _digits(rng)
    return s, max(s), f"max {s} is {max(s)}."


def _mul(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a} {b}", str(a * b), f"mul {a} {b} is {a * b}."


Generator = Callable[[random.Random], tuple[str, str, str]]
# The demo's tasks: task name -> generator of (argument, answer, the fact as a sentence)
TASKS: dict[str, Generator] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "upper": _upper,
}
# The study's larger mixture (`remix-train study`): many tasks, so that one small LoRA is short
# of capacity for all of them.
STUDY_TASKS: dict[str, Generator] = TASKS | {
    "next": _next,
    "double": _double,
    "max": _max,
    "mul": _mul,
}
DEMO_TASK_NAMES = tuple(TASKS)


def task_example(task: str, rng: random.Random) -> Example:
    arg, answer, _ = STUDY_TASKS[task](rng)
    return Example(prompt=f"{task} {arg} =", completion=f" {answer}")


def task_of(example: Example) -> str:
    return example.prompt.split(" ", 1)[0]


def make_examples(
    count: int,
    seed: int,
    exclude: set[str] = frozenset(),
    tasks: Sequence[str] = DEMO_TASK_NAMES,
) -> list[Example]:
    """`count` examples cycling through `tasks`, skipping prompts in `exclude` (held-out set)."""
    rng = random.Random(seed)
    names = list(tasks)
    out: list[Example] = []
    while len(out) < count:
        ex = task_example(names[len(out) % len(names)], rng)
        if ex.prompt not in exclude:
            out.append(ex)
    return out


def held_out_split(
    train_count: int, eval_count: int, seed: int, tasks: Sequence[str] = DEMO_TASK_NAMES
) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples of `tasks`; no eval prompt appears in train."""
    eval_set = make_examples(eval_count, seed + 1, tasks=tasks)
    held_out = {e.prompt for e in eval_set}
    return make_examples(train_count, seed + 2, exclude=held_out, tasks=tasks), eval_set


def pretraining_corpus(
    count: int,
    seed: int,
    weights: dict[str, float] | None = None,
    tasks: Sequence[str] = DEMO_TASK_NAMES,
) -> list[str]:
    """Prose lines stating one fact of `tasks` each, for language-model pretraining; `weights`
    sets each task's share of the lines (default: equal)."""
    rng = random.Random(seed)
    names = list(tasks)
    shares = [(weights or {}).get(name, 1.0) for name in names]
    return [STUDY_TASKS[rng.choices(names, shares)[0]](rng)[2] for _ in range(count)]

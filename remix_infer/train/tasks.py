"""Synthetic tasks for the demo: each has an exact answer a person can check from the prompt.

Fine-tuning and serving use the prompt format `"<task> <argument> ="` with completion
`" <answer>"`, e.g. `reverse kqmz =` -> ` zmqk`. The base model is pretrained on the same
facts written as sentences (`reverse kqmz is zmqk.`), so fine-tuning teaches the format.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

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


# task name -> generator of (argument, answer, the same fact as a pretraining sentence)
TASKS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "upper": _upper,
}


def task_example(task: str, rng: random.Random) -> Example:
    arg, answer, _ = TASKS[task](rng)
    return Example(prompt=f"{task} {arg} =", completion=f" {answer}")


def task_of(example: Example) -> str:
    return example.prompt.split(" ", 1)[0]


def make_examples(count: int, seed: int, exclude: set[str] = frozenset()) -> list[Example]:
    """`count` examples cycling through the tasks, skipping prompts in `exclude` (held-out set)."""
    rng = random.Random(seed)
    names = list(TASKS)
    out: list[Example] = []
    while len(out) < count:
        ex = task_example(names[len(out) % len(names)], rng)
        if ex.prompt not in exclude:
            out.append(ex)
    return out


def held_out_split(
    train_count: int, eval_count: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples; no eval prompt appears in train."""
    eval_set = make_examples(eval_count, seed + 1)
    return make_examples(train_count, seed + 2, exclude={e.prompt for e in eval_set}), eval_set


def pretraining_corpus(count: int, seed: int, weights: dict[str, float] | None = None) -> list[str]:
    """Prose lines stating one task fact each, for language-model pretraining; `weights` sets
    each task's share of the lines (default: equal)."""
    rng = random.Random(seed)
    names = list(TASKS)
    shares = [(weights or {}).get(name, 1.0) for name in names]
    return [TASKS[rng.choices(names, shares)[0]](rng)[2] for _ in range(count)]

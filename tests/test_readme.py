"""The README's demo exchanges are what the served demo checkpoint answers, and they are correct.

The exchanges are parsed from README.md (the curl example's prompt and reply text, and the
Python example's `# 'PROMPT' -> 'ANSWER'` lines), so README and demo cannot drift apart.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import asdict
from pathlib import Path

import openai
import pytest
from helpers.servers import SMALL_ENGINE, running_server

from remix_infer.train.demo import DemoSettings
from remix_infer.train.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PYTHON_EXCHANGE = re.compile(r"^# ('[^']*') -> ('[^']*')$", re.MULTILINE)
CHAT_EXCHANGE = re.compile(r"^# chat ('[^']*') -> ('[^']*')$", re.MULTILINE)
CURL_PROMPT = re.compile(r'"prompt": "([^"]*)"')
CURL_REPLY = re.compile(r'^\{"id":"cmpl-.*$', re.MULTILINE)


def readme_exchanges() -> list[tuple[str, str]]:
    """(prompt, completion) pairs the README shows the demo answering (its opening, before
    the Serving section's request examples)."""
    text = README.read_text().split("\n## ", 1)[0]
    pairs = [(ast.literal_eval(p), ast.literal_eval(a)) for p, a in PYTHON_EXCHANGE.findall(text)]
    curl_prompts, curl_replies = CURL_PROMPT.findall(text), CURL_REPLY.findall(text)
    assert len(curl_prompts) == len(curl_replies) == 1, "README: one curl example and its reply"
    pairs.append((curl_prompts[0], json.loads(curl_replies[0])["choices"][0]["text"]))
    return pairs


def readme_chat_exchanges() -> list[tuple[str, str]]:
    """(user message, assistant content) pairs of the README's chat example."""
    text = README.read_text().split("\n## ", 1)[0]
    return [(ast.literal_eval(p), ast.literal_eval(a)) for p, a in CHAT_EXCHANGE.findall(text)]


def test_readme_answers_are_correct():
    """Every shown answer is the task's true answer (checked by the task generators' rules)."""
    assert len(readme_chat_exchanges()) == 1
    for prompt, answer in readme_chat_exchanges():
        assert answer == " " + true_answer(prompt), prompt
    pairs = readme_exchanges()
    assert len(pairs) >= 4 and {task_of_prompt(p) for p, _ in pairs} <= set(TASKS)
    for prompt, answer in pairs:
        assert answer == " " + true_answer(prompt), prompt


def task_of_prompt(prompt: str) -> str:
    return prompt.split(" ", 1)[0]


def true_answer(prompt: str) -> str:
    """The answer to a demo prompt `TASK ARGS =`, computed directly (not by the model)."""
    task, args = prompt.removesuffix(" =").split(" ", 1)
    if task == "add":
        return str(sum(int(a) for a in args.split()))
    return {"reverse": args[::-1], "sort": "".join(sorted(args)), "upper": args.upper()}[task]


@pytest.fixture(scope="module")
def full_demo_checkpoint() -> Path:
    """./demo-checkpoint as `make demo` builds it (built here if absent or built otherwise:
    a few minutes, the same directory `make serve` then serves)."""
    from remix_infer.train.demo import run_demo

    out = ROOT / "demo-checkpoint"
    report = out / "report.json"
    wanted = json.loads(json.dumps(asdict(DemoSettings())))  # as report.json holds them
    if not report.is_file() or json.loads(report.read_text())["settings"] != wanted:
        run_demo(out)
    return out


@pytest.mark.slow
def test_served_demo_gives_the_readme_answers(full_demo_checkpoint, tmp_path):
    pairs = readme_exchanges()
    log_path = tmp_path / "server.log"
    args = [*SMALL_ENGINE, "--max-model-len", "128", "--served-model-name", "remix-demo"]
    with running_server(full_demo_checkpoint, log_path, args) as server:
        client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0)
        for prompt, answer in pairs:
            out = client.completions.create(
                model="remix-demo", prompt=prompt, max_tokens=8, temperature=0
            )
            assert out.choices[0].text == answer, prompt
        for prompt, answer in readme_chat_exchanges():
            chat = client.chat.completions.create(
                model="remix-demo",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=8,
                temperature=0,
            )
            assert chat.choices[0].message.content == answer, prompt

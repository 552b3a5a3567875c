"""Worked example of composing existing LoRAs (docs/compose.md): on the demo base model, train
one PEFT LoRA per demo task with the real `peft` package, then compose the four with each method
(remix, mor, mixer: frozen pool, routers trained on the union of the tasks' data), and report
held-out exact match per task of each expert alone, of each composed model, and of one PEFT
LoRA trained on the union, with wall times. Writes results/compose_example_<N>_steps.json.

    python benchmarks/compose_example.py [--work DIR] [--steps N] [--router-steps N] [--router-lr]

A rerun in the same --work reuses its base model and LoRAs (their wall times are then absent).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from remix_infer.modeling import load_remix_model
from remix_infer.train.compose import compose
from remix_infer.train.data import sequence_losses, tokenize
from remix_infer.train.demo import DemoSettings, accuracy_by_task, build_tokenizer, pretrain_base
from remix_infer.train.evaluate import exact_match
from remix_infer.train.tasks import TASKS, make_examples, pretraining_corpus, task_of
from remix_infer.train.trainer import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
# (row name, --method, --top-k, --routing-scope). "mor, module scope" is mor with a router per
# module instead of MoR-LoRA's shared one: the shared router reads the first layer's input, which
# in this character-level model is the current character's embedding alone.
COMPOSED = [
    ("remix", "remix", 1, "auto"),
    ("mor", "mor", 1, "auto"),
    ("mor, module scope", "mor", 1, "module"),
    ("mixer", "mixer", 2, "auto"),
]


def train_peft_lora(base: Path, tokenizer, examples, out: Path, steps: int, seed: int) -> float:  # noqa: ANN001
    """One PEFT LoRA on `examples` (AdamW, batch 32, lr 5e-3), saved by PEFT; returns seconds."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**LORA))
    data = tokenize(tokenizer, examples, max_length=64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in (bar := tqdm(range(steps), desc=out.name)):
        batch = data.batch(torch.randint(0, len(data), (32,), generator=gen))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = sequence_losses(logits, batch["labels"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{float(loss):.3f}")
    model.save_pretrained(out)
    return time.perf_counter() - start


def peft_accuracy(base: Path, adapter: Path, tokenizer, eval_set) -> dict[str, float]:  # noqa: ANN001
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return accuracy_by_task(exact_match(model.eval(), tokenizer, eval_set), eval_set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("compose-example"))
    parser.add_argument("--steps", type=int, default=150, help="PEFT LoRA training steps")
    parser.add_argument("--router-steps", type=int, default=100)
    parser.add_argument("--router-lr", type=float, default=2e-2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    s, work = DemoSettings(), args.work
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    times: dict[str, float] = {}

    base = work / "base"
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(base)
    if not (base / "config.json").exists():
        pretrain_base(tokenizer, pretraining_corpus(s.pretrain_lines, s.seed), s, base)
        times["pretrain base"] = time.perf_counter() - t0
    eval_set = make_examples(s.eval_examples, s.seed + 1)
    train_set = make_examples(s.train_examples, s.seed + 2, exclude={e.prompt for e in eval_set})

    experts = []
    for i, task in enumerate(TASKS):
        folder = work / f"lora-{task}"
        mine = [e for e in train_set if task_of(e) == task]
        if not (folder / "adapter_config.json").exists():  # reused by a rerun in the same --work
            times[f"LoRA {task}"] = train_peft_lora(base, tokenizer, mine, folder, args.steps, i)
        rows[f"LoRA {task} alone"] = peft_accuracy(base, folder, tokenizer, eval_set)
        experts.append(folder)
    union = work / "lora-union"
    if not (union / "adapter_config.json").exists():
        times["LoRA union"] = train_peft_lora(base, tokenizer, train_set, union, args.steps, 9)
    rows["one LoRA on the union"] = peft_accuracy(base, union, tokenizer, eval_set)

    train_data = tokenize(tokenizer, train_set, max_length=64)
    for name, method, top_k, scope in COMPOSED:
        t0 = time.perf_counter()
        config = TrainConfig(method=method, top_k=top_k, max_steps=args.router_steps,
                             batch_size=16, learning_rate=args.router_lr, warmup_steps=10,
                             eval_every=0, routing_scope=scope)  # fmt: skip
        folder = work / f"composed-{name.replace(' ', '-')}"
        out = compose(str(base), experts, folder, config, train_data)
        times[f"compose {name}"] = time.perf_counter() - t0
        model, _ = load_remix_model(out)
        rows[f"composed: {name}"] = accuracy_by_task(
            exact_match(model, tokenizer, eval_set), eval_set
        )
    RESULTS.mkdir(exist_ok=True)
    report = {"accuracy": rows, "seconds": {k: round(v, 1) for k, v in times.items()},
              "settings": {"peft": LORA, "steps": args.steps, "router_steps": args.router_steps,
                           "router_lr": args.router_lr,
                           "eval_examples": len(eval_set)}}  # fmt: skip
    name = f"compose_example_{args.router_steps}_steps.json"
    (RESULTS / name).write_text(json.dumps(report, indent=1) + "\n")
    print(f"| | all | {' | '.join(TASKS)} |")
    for name, acc in rows.items():
        print(f"| {name} | {acc['all']:.3f} | " + " | ".join(f"{acc[t]:.3f}" for t in TASKS) + " |")
    print(report["seconds"])


if __name__ == "__main__":
    main()

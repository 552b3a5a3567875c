"""`remix-train`: fine-tune ReMix checkpoints, compose or import PEFT LoRAs, or build the demo
checkpoint. `train` also runs as N data-parallel processes under
`torchrun --nproc-per-node N -m remix_infer.train.cli ...` (or `accelerate launch`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path

# Before torch loads OpenMP: its default busy-waiting threads make a training step ~10x slower
# when another process holds one of the cores (measured on the shared 2-core dev machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pydantic import ValidationError  # noqa: E402

from remix_infer.config import ALL_TARGET_MODULES, validation_problems  # noqa: E402
from remix_infer.train.compose import COMPOSE_METHODS  # noqa: E402
from remix_infer.train.data import TokenizedData  # noqa: E402
from remix_infer.train.parallel import init_distributed, shutdown_distributed  # noqa: E402
from remix_infer.train.trainer import TrainConfig  # noqa: E402

# Commands that run as one process or under a launcher (parallel.py).
DATA_PARALLEL_COMMANDS = ("train",)

# TrainConfig fields that a composed pool takes from its experts, not from flags.
POOL_FIELDS = {"method", "num_loras", "rank", "lora_rank", "alpha", "omega_rule", "target_modules"}

# `train --preset NAME`: TrainConfig defaults (flags given still win). remix-paper is the ReMix
# paper's setup (n 8, k 4, r 8 on all seven projections, omega by the rsLoRA rule 2/sqrt(kr),
# M 4); the paper trained with LLaMA-Factory and names no learning rate or schedule, so those
# are LLaMA-Factory's Llama-3 LoRA SFT example's: lr 1e-4, warm-up 10%, cosine, per-device batch
# 1 x 8 accumulation, cutoff 2048, bf16 (docs/training.md).
PRESETS: dict[str, dict[str, object]] = {
    "remix-paper": {
        "method": "remix",
        "num_loras": 8,
        "top_k": 4,
        "rank": 8,
        "target_modules": list(ALL_TARGET_MODULES),
        "alpha": 2.0,
        "omega_rule": "rslora",
        "num_samples": 4,
        "learning_rate": 1e-4,
        "router_learning_rate": 1e-4,
        "warmup_steps": None,
        "batch_size": 1,
        "grad_accum": 8,
        "max_length": 2048,
        "dtype": "bfloat16",
        "gradient_checkpointing": True,
    }
}


def _add_train_config_flags(
    parser: argparse.ArgumentParser,
    skip: set[str] = frozenset(),
    defaults: dict[str, object] | None = None,
) -> None:
    """One flag per TrainConfig field (--max-steps, --num-samples, ...), defaults from
    `defaults` (a preset), else the dataclass; none for the fields in `skip`."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default = (defaults or {}).get(f.name, default)
        hint = hints[f.name]
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        if f.name == "target_modules":
            parser.add_argument(flag, nargs="+", default=default, help="projections to adapt")
        elif f.name == "always_on_modules":
            parser.add_argument(
                flag, nargs="+", default=default,
                help="projections with the always-on LoRA (default: all adapted; mor: q, k, v, o)",
            )  # fmt: skip
        elif f.name == "batch_size":
            parser.add_argument(
                flag, type=int, default=default,
                help=f"sequences per process and micro-batch (default: {default}); the global "
                "batch is this x processes x --grad-accum",
            )  # fmt: skip
        elif f.name == "warmup_steps":
            parser.add_argument(
                flag, type=int, default=default,
                help=f"default: {'10%% of --max-steps' if default is None else default}",
            )  # fmt: skip
        elif hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif choices:
            parser.add_argument(flag, choices=choices, default=default)
        else:
            kind = next((t for t in (int, float, str) if t in (hint, *typing.get_args(hint))), str)
            parser.add_argument(flag, type=kind, default=default, help=f"default: {default}")


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True,
        help='records {"prompt", "completion"} or chat {"messages"}: a JSONL or Parquet file, a '
        "datasets save_to_disk folder, or a hub dataset name in the local cache",
    )  # fmt: skip
    parser.add_argument("--eval-data", help="the same forms as --data")
    parser.add_argument(
        "--data-split", default="train",
        help="split of a save_to_disk DatasetDict or hub dataset for --data (default: train)",
    )  # fmt: skip
    parser.add_argument("--eval-split", default="validation", help="the same for --eval-data")


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The CLI; `preset`: the train command's defaults come from PRESETS[preset]."""
    parser = argparse.ArgumentParser(prog="remix-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build the demo base model and ReMix checkpoint in DIR")
    demo.add_argument("--out", required=True, type=Path)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a seconds-long run (tests)")

    train = sub.add_parser("train", help="fine-tune a base model on prompt/completion or chat data")
    train.add_argument("--base-model", required=True, help="local model dir (or a cached hub id)")
    _add_data_flags(train)
    train.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    train.add_argument("--log-dir", type=Path, help="write TensorBoard scalars here")
    train.add_argument(
        "--stop-at-step", type=int,
        help="save and exit after this step (the schedule still spans --max-steps; --resume "
        "continues)",
    )  # fmt: skip
    train.add_argument(
        "--preset", choices=sorted(PRESETS),
        help="defaults of a recipe (flags given still win): remix-paper, the ReMix paper's "
        "(docs/training.md)",
    )  # fmt: skip
    _add_train_config_flags(train, defaults=PRESETS.get(preset))

    imp = sub.add_parser("import-peft", help="one PEFT LoRA folder as a checkpoint (n=1, k=1)")
    imp.add_argument("adapter", type=Path, help="PEFT LoRA folder (adapter_config.json, ...)")
    imp.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    imp.add_argument("--base-model", help="default: the adapter's base_model_name_or_path")

    comp = sub.add_parser(
        "compose", help="PEFT LoRA folders as a frozen pool; train only the routers"
    )
    comp.add_argument("--base-model", required=True, help="local base model directory")
    pool = comp.add_mutually_exclusive_group(required=True)
    pool.add_argument("--experts", nargs="+", type=Path, help="PEFT LoRA folders")
    pool.add_argument(
        "--pool", type=Path, help="or a ReMix checkpoint whose LoRA pools are the experts"
    )
    _add_data_flags(comp)
    comp.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    comp.add_argument("--method", choices=COMPOSE_METHODS, default="remix")
    comp.add_argument(
        "--omega", type=float, default=1.0,
        help="scale of a selected expert (remix; mixer: of its softmax weight; mor: always 1)",
    )  # fmt: skip
    comp.add_argument("--top-k", type=int, default=1, help="experts per token (mor: always 1)")
    _add_train_config_flags(comp, skip=POOL_FIELDS | {"top_k"})

    dist = sub.add_parser(
        "distill", help="each PEFT expert answers its domain's prompts: the router's data"
    )
    dist.add_argument("--base-model", required=True, help="local base model directory")
    dist.add_argument("--experts", required=True, nargs="+", type=Path, help="PEFT LoRA folders")
    dist.add_argument(
        "--prompts", required=True, type=Path,
        help='JSONL of {"prompt", "domain"}: domain = expert index or folder name',
    )  # fmt: skip
    dist.add_argument("--out", required=True, type=Path, help="JSONL to write")
    dist.add_argument("--max-new-tokens", type=int, default=64)

    analyze = sub.add_parser(
        "analyze", help="routing of a checkpoint over prompts, per layer and module"
    )
    analyze.add_argument(
        "checkpoint", type=Path,
        help="ReMix checkpoint directory (a run's --out: also each save it kept, --save-every)",
    )  # fmt: skip
    analyze.add_argument(
        "--data", required=True, type=Path, help='JSONL of {"prompt"} (+ optional "completion")'
    )
    analyze.add_argument(
        "--out", type=Path, default=Path("analysis"), help="writes analysis.json, analysis.png"
    )
    analyze.add_argument("--batch-size", type=int, default=16)

    study = sub.add_parser("study", help="measure the ReMix paper's claims over seeds (95%% CIs)")
    study.add_argument(
        "--preset", choices=["cpu", "gpu", "quick"], default="cpu", help="quick: seconds (tests)"
    )
    study.add_argument("--out", type=Path, default=Path("study"), help="writes study.json, PNGs")
    study.add_argument(
        "--claims",
        type=claim_numbers,
        default=(1, 2, 3, 4),
        help="comma-separated claims to measure (default 1,2,3,4): 1 routing collapse, "
        "2 equal parameters, 3 RLOO samples M, 4 inference routing",
    )
    return parser


def claim_numbers(text: str) -> tuple[int, ...]:
    """--claims: '1,3' -> (1, 3); anything else is a usage error naming the valid claims."""
    try:
        claims = tuple(sorted({int(c) for c in text.split(",")}))
    except ValueError:
        claims = ()
    if not claims or not set(claims) <= {1, 2, 3, 4}:
        raise argparse.ArgumentTypeError(f"'{text}': expected claims among 1,2,3,4, e.g. 2,4")
    return claims


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with a --preset's defaults under the flags given."""
    # only train's --preset names a recipe (study has presets of its own); the full parser
    # checks the choice and prints the usage
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("command", nargs="?")
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    recipe = known.preset if known.command == "train" and known.preset in PRESETS else None
    return build_parser(recipe).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ranks = init_distributed() if args.command in DATA_PARALLEL_COMMANDS else None
    logging.basicConfig(
        level=logging.INFO if ranks is None or ranks.is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code = 1
    try:
        code = run_command(args)
    finally:
        if ranks is not None:
            shutdown_distributed(wait=code == 0)
    return code


def run_command(args: argparse.Namespace) -> int:
    """The command's exit status; bad input is a message naming what is wrong, status 2."""
    commands = {
        "demo": run_demo_command,
        "train": run_train_command,
        "import-peft": run_import_command,
        "compose": run_compose_command,
        "distill": run_distill_command,
        "analyze": run_analyze_command,
        "study": run_study_command,
    }
    try:
        return commands[args.command](args)
    except ValidationError as e:  # a checkpoint config that the flags describe
        print(
            f"remix-train: error: not a valid checkpoint config: {validation_problems(e)}",
            file=sys.stderr,
        )
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"remix-train: error: {e}", file=sys.stderr)
        return 2


def run_demo_command(args: argparse.Namespace) -> int:
    from remix_infer.train.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    report = run_demo(args.out, dataclasses.replace(settings, seed=args.seed))
    print(f"demo checkpoint: {args.out}  ({report['total_seconds']} s)")
    for method, row in report["summary"].items():
        ess = "" if row["mean_ess"] is None else f"  mean ESS {row['mean_ess']:.2f}"
        print(f"  {method:8s} exact match {row['accuracy']:.3f}{ess}")
    print(f"report: {args.out / 'report.json'}, {args.out / 'report.png'}")
    return 0


def _train_inputs(
    args: argparse.Namespace,
) -> tuple[TrainConfig, TokenizedData, TokenizedData | None]:
    """The TrainConfig of the flags, and the tokenized --data and --eval-data."""
    from transformers import AutoTokenizer

    from remix_infer.train.data import read_examples, tokenize

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    train_data = tokenize(tokenizer, read_examples(args.data, args.data_split), config.max_length)
    eval_data = (
        tokenize(tokenizer, read_examples(args.eval_data, args.eval_split), config.max_length)
        if args.eval_data
        else None
    )
    return config, train_data, eval_data


def run_import_command(args: argparse.Namespace) -> int:
    from remix_infer.train.compose import import_peft

    out = import_peft(args.adapter, args.out, args.base_model)
    print(f"checkpoint: {out}")
    return 0


def run_compose_command(args: argparse.Namespace) -> int:
    from remix_infer.train.compose import compose

    config, train_data, eval_data = _train_inputs(args)
    out = compose(
        args.base_model, args.experts, args.out, config, train_data, eval_data, args.omega,
        pool_checkpoint=args.pool,
    )  # fmt: skip
    print(f"checkpoint: {out}")
    return 0


def run_distill_command(args: argparse.Namespace) -> int:
    import json

    from remix_infer.train.compose import distill, read_domain_prompts

    prompts = read_domain_prompts(args.prompts, args.experts)
    records = distill(args.base_model, args.experts, prompts, args.max_new_tokens)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"{len(records)} traces: {args.out}")
    return 0


def run_train_command(args: argparse.Namespace) -> int:
    from remix_infer.train.trainer import Trainer

    config, train_data, eval_data = _train_inputs(args)
    trainer = Trainer(config, args.base_model, train_data, eval_data)
    if args.resume:
        trainer.resume(args.out)
    trainer.train(args.out, stop_at_step=args.stop_at_step, log_dir=args.log_dir)
    if trainer.ranks.is_main:
        print(f"checkpoint: {args.out} (step {trainer.step})")
    return 0


def run_analyze_command(args: argparse.Namespace) -> int:
    from remix_infer.train.analyze import (
        analyze_checkpoint,
        analyze_run,
        plot_run,
        plot_shares,
        read_prompts,
        run_snapshots,
    )

    texts = read_prompts(args.data)
    report = analyze_checkpoint(args.checkpoint, texts, args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "analysis.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_shares(report, args.out / "analysis.png")
    modules = report["modules"].values()
    print(
        f"{len(report['modules'])} adapted modules over {report['sequences']} sequences: "
        f"effective LoRAs in use {min(m['effective_loras'] for m in modules):.2f} to "
        f"{max(m['effective_loras'] for m in modules):.2f} of {report['num_loras']}, "
        f"{len(report['collapsed_modules'])} collapsed"
    )
    for name in report["collapsed_modules"]:
        print(f"  collapsed: {name}")
    print(f"report: {args.out / 'analysis.json'}, {args.out / 'analysis.png'}")
    snapshots = run_snapshots(args.checkpoint)
    if snapshots:
        run = analyze_run(snapshots, texts, args.batch_size)
        (args.out / "analysis_steps.json").write_text(json.dumps(run, indent=1) + "\n")
        plot_run(run, args.out / "analysis_steps.png")
        for s in run["steps"]:
            in_use = [m["effective_loras"] for m in s["modules"].values()]
            collapsed = sum(m["collapsed"] for m in s["modules"].values())
            print(f"  step {s['step']}: effective LoRAs {min(in_use):.2f} to {max(in_use):.2f}, "
                  f"{collapsed} collapsed")  # fmt: skip
        print(f"over the run's saves: {args.out / 'analysis_steps.json'}, "
              f"{args.out / 'analysis_steps.png'}")  # fmt: skip
    return 0


def run_study_command(args: argparse.Namespace) -> int:
    from remix_infer.train.study import run_study

    report = run_study(args.out, args.preset, args.claims)
    for name, claim in report["claims"].items():
        print(f"{name}: {claim['verdict']}")
    print(f"report: {args.out / 'study.json'} ({report['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

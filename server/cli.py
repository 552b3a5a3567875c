"""`remix-serve`: serve a ReMix checkpoint over an OpenAI-compatible HTTP API.

vLLM spawns its engine-core and worker processes, so this module only does work under
`main()` (called from `if __name__ == "__main__"` or the console script).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from remix_infer.config import CONFIG_FILE
from server.settings import EngineSettings, ServerSettings, SettingsError, add_flags, from_args

if TYPE_CHECKING:
    from server.engine_client import RemixEngine

log = logging.getLogger("remix_serve")

DEFAULT_CHECKPOINT = "demo-checkpoint"
DEMO_MODEL_NAME = "remix-demo"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="remix-serve",
        description="Serve a ReMix checkpoint with an OpenAI-compatible API (vLLM engine).",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        action="append",
        metavar="[NAME=]DIR",
        help="a checkpoint directory to serve, as model NAME (default: the directory's name); "
        "repeat it to serve several checkpoints over the same base model (env "
        f"REMIX_CHECKPOINT, comma-separated; default: ./{DEFAULT_CHECKPOINT}, built first if "
        "absent)",
    )
    source.add_argument(
        "--base-model",
        default=None,
        help="instead of a checkpoint: serve this Hugging Face model directory plainly, with no "
        "adapters (the same server without ReMix, for comparisons)",
    )
    p.add_argument(
        "--checkpoint-dir",
        action="append",
        metavar="DIR",
        help="serve every checkpoint folder under DIR (a folder holding remix_config.json, "
        "named after the folder), each loaded into a slot on its first request and evicted "
        "least recently used; repeatable (env REMIX_CHECKPOINT_DIR, comma-separated)",
    )
    p.add_argument(
        "--serve-base-model",
        metavar="NAME",
        default=os.environ.get("REMIX_SERVE_BASE_MODEL") or None,
        help="also serve the checkpoints' base model, without adapters, as model NAME "
        "(env REMIX_SERVE_BASE_MODEL)",
    )
    p.add_argument("--host", default=os.environ.get("REMIX_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("REMIX_PORT", "8000")))
    p.add_argument(
        "--served-model-name",
        default=os.environ.get("REMIX_SERVED_MODEL_NAME") or None,
        help="model name clients use for a single checkpoint given as --checkpoint DIR, or for "
        f"--base-model (env REMIX_SERVED_MODEL_NAME; default: '{DEMO_MODEL_NAME}' for the demo "
        "checkpoint, else the directory's name)",
    )
    # The engine's and the server's settings: one flag each, its default from REMIX_<NAME>.
    add_flags(p, EngineSettings)
    add_flags(p, ServerSettings)
    p.add_argument("--log-level", default=os.environ.get("REMIX_LOG_LEVEL", "info"))
    return p


def resolve_checkpoint(arg: str | None) -> Path:
    """The checkpoint to serve; with no argument ./demo-checkpoint. A demo checkpoint
    (a directory named demo-checkpoint) that holds none yet (absent, or its build was
    interrupted before the checkpoint was written) is built first."""
    path = Path(arg if arg is not None else DEFAULT_CHECKPOINT)
    if path.name == DEFAULT_CHECKPOINT and not (path / CONFIG_FILE).exists():
        log.info("%s holds no checkpoint: building the demo checkpoint there", path)
        log.info("(trains a small model on this machine, about 3 minutes)")
        from remix_infer.train.demo import run_demo

        run_demo(path)
        log.info("demo checkpoint built in ./%s", path)
    return path


def directory_model_name(path: Path) -> str:
    """The model name of a checkpoint given without one: its directory's name."""
    name = path.resolve().name
    return DEMO_MODEL_NAME if name == DEFAULT_CHECKPOINT else name


def split_checkpoint_spec(spec: str) -> tuple[str | None, str]:
    """`NAME=DIR` -> (NAME, DIR); `DIR` -> (None, DIR). An existing directory is a DIR even if
    its name holds a '='."""
    name, eq, directory = spec.partition("=")
    if not eq or Path(spec).exists():
        return None, spec
    if not name or any(c.isspace() or c == "," for c in name):
        raise SettingsError(f"--checkpoint {spec}: expected NAME=DIR or DIR, NAME without spaces")
    return name, directory


def named_checkpoints(
    specs: list[str] | None, served_model_name: str | None, base_model_name: str | None
) -> dict[str, Path]:
    """The checkpoints to serve, by model name, in slot order, from the --checkpoint flags (none:
    the demo checkpoint). Raises SettingsError for names that cannot work together."""
    pairs = [split_checkpoint_spec(spec) for spec in specs] if specs else [(None, None)]
    bare = [directory for name, directory in pairs if name is None]
    if served_model_name is not None and (len(pairs) > 1 or not bare):
        raise SettingsError(
            "--served-model-name names a single checkpoint given as --checkpoint DIR; to serve "
            "several, name each: --checkpoint NAME=DIR"
        )
    named: dict[str, Path] = {}
    for name, directory in pairs:
        path = resolve_checkpoint(directory)
        name = name or served_model_name or directory_model_name(path)
        if name in named:
            raise SettingsError(
                f"--checkpoint: two checkpoints are named '{name}' ({named[name]} and {path}); "
                "name them apart with --checkpoint NAME=DIR"
            )
        if name == base_model_name:
            raise SettingsError(
                f"--serve-base-model '{name}' is also the name of the checkpoint {path}: "
                "give one of them another name"
            )
        named[name] = path
    return named


def checkpoints_from_environment(args: argparse.Namespace) -> None:
    """REMIX_CHECKPOINT and REMIX_CHECKPOINT_DIR (comma-separated) for the flags not given. Not
    argparse defaults: an `append` flag would add to them instead of replacing them."""
    for flag, variable in (("checkpoint", "REMIX_CHECKPOINT"), ("checkpoint_dir", "REMIX_CHECKPOINT_DIR")):  # fmt: skip
        env = os.environ.get(variable)
        if getattr(args, flag) is None and args.base_model is None and env:
            setattr(args, flag, [spec.strip() for spec in env.split(",") if spec.strip()])


DIR_SLOTS = 4  # with --checkpoint-dir, --max-checkpoints defaults to the --checkpoint flags + this


def first_folder_checkpoint(dirs: list[Path]) -> tuple[str, Path]:
    """The first valid checkpoint folder of the directories (by name): it sizes the slots when
    no --checkpoint is given. SettingsError if there is none."""
    from remix_infer.checkpoint import load_checkpoint
    from server.store import folders_under

    problems = []
    for root in dirs:
        found, refused = folders_under(root)
        problems += refused.values()
        for name, path in found.items():
            try:
                load_checkpoint(path)
                return name, path
            except ValueError as e:
                problems.append(str(e))
    raise SettingsError(
        f"--checkpoint-dir {', '.join(map(str, dirs))}: no valid checkpoint folder to size the "
        "slots from (give one with --checkpoint)" + "".join(f"\n  {p}" for p in problems)
    )


def store_engine(args: argparse.Namespace, settings: EngineSettings) -> RemixEngine | None:
    """The engine for --checkpoint-dir without --checkpoint (its first folder sizes the slots
    and starts loaded, unpinned); None when there is a --checkpoint (or no --checkpoint-dir).
    Sets --max-checkpoints' default."""
    from server.engine_client import RemixEngine

    dirs = [Path(d) for d in args.checkpoint_dir or []]
    for d in dirs:
        if not d.is_dir():
            raise SettingsError(f"--checkpoint-dir {d}: not a directory")
    if not dirs:
        return None
    if settings.max_checkpoints is None:
        settings.max_checkpoints = len(args.checkpoint or []) + DIR_SLOTS
    if args.checkpoint:
        return None
    name, path = first_folder_checkpoint(dirs)
    return RemixEngine({name: path}, settings, base_model_name=args.serve_base_model, pinned=False)


def server_settings(args: argparse.Namespace) -> ServerSettings:
    dirs = [Path(d).resolve() for d in args.checkpoint_dir or []]
    return from_args(ServerSettings, args, checkpoint_dirs=dirs)


def build_engine(args: argparse.Namespace) -> RemixEngine:
    """The engine wrapper for the parsed flags: checkpoints validated, no process started.
    Raises SettingsError or CheckpointError with a message for the user."""
    from server.engine_client import RemixEngine

    settings = from_args(EngineSettings, args)
    if args.base_model and args.checkpoint_dir:
        raise SettingsError("--checkpoint-dir serves checkpoints: it does not go with --base-model")
    engine = store_engine(args, settings)
    if engine is not None:
        return engine
    if args.base_model:
        if not (Path(args.base_model) / "config.json").is_file():
            raise SettingsError(
                f"cannot serve {args.base_model}: no config.json "
                "(--base-model takes a Hugging Face model directory)"
            )
        if args.serve_base_model:
            raise SettingsError(
                "--serve-base-model serves a checkpoint's base model beside it; with "
                "--base-model, name the model with --served-model-name"
            )
        name = args.served_model_name or Path(args.base_model).resolve().name
        return RemixEngine(None, settings, base_model=args.base_model, base_model_name=name)
    checkpoints = named_checkpoints(args.checkpoint, args.served_model_name, args.serve_base_model)
    return RemixEngine(checkpoints, settings, base_model_name=args.serve_base_model)


def build_batch_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "remix-serve batch"
    p.description = (
        "Answer a file of requests in OpenAI's Batch format (JSONL lines of custom_id, method, "
        "url, body) offline, with the same engine and request handling as the server."
    )
    p.add_argument("--input", required=True, type=Path, help="requests, one JSON line each")
    p.add_argument("--output", required=True, type=Path, help="answers, in the input's order")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    batch = argv[:1] == ["batch"]
    args = (build_batch_parser() if batch else build_parser()).parse_args(argv[batch:])
    checkpoints_from_environment(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(".cache/vllm").resolve()))

    try:
        engine = build_engine(args)
    except ValueError as e:  # SettingsError, CheckpointError, incompatible checkpoints
        print(f"remix-serve: {e}", file=sys.stderr)
        return 2
    if batch:
        return run_batch_command(engine, server_settings(args), args)
    if engine.settings.headless:
        log.info("loaded %s; headless: this host runs workers only", engine.describe())
        engine.run_headless()
        return 0

    log.info("loaded %s", engine.describe())
    log.info(
        "serving %s on http://%s:%d/v1 (API key %s); starting the engine...",
        ", ".join(f"'{m.name}'" for m in engine.models.listed()),
        args.host,
        args.port,
        "required" if args.api_key else "not required",
    )
    return serve(engine, server_settings(args), args)


def run_batch_command(
    engine: RemixEngine, settings: ServerSettings, args: argparse.Namespace
) -> int:
    from server.batch import run_batch

    if not args.input.is_file():
        print(f"remix-serve batch: --input {args.input}: no such file", file=sys.stderr)
        return 2
    log.info("loaded %s; answering %s", engine.describe(), args.input)
    try:
        failed = asyncio.run(run_batch(engine, settings, args.input, args.output))
    except RuntimeError as e:  # the engine failed
        print(f"remix-serve batch: {e}", file=sys.stderr)
        return 1
    log.info("wrote %s (%d line(s) answered with an error)", args.output, failed)
    return 0


# After the engine fails: /health and /ready answer 503 "failed" for FAILURE_REPORT_S (so a
# probe sees why), then the server stops accepting, gives in-flight requests FAILURE_DRAIN_S to
# receive their error and exits non-zero, so compose, systemd or Kubernetes restart it; if that
# shutdown hangs, the process ends anyway FAILURE_EXIT_S after the failure.
FAILURE_REPORT_S = 0.5
FAILURE_DRAIN_S = 1
FAILURE_EXIT_S = 3.5


def serve(engine: RemixEngine, settings: ServerSettings, args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    failed = False

    def stop() -> None:
        server.config.timeout_graceful_shutdown = FAILURE_DRAIN_S
        server.should_exit = True

    def on_engine_failure() -> None:
        nonlocal failed
        failed = True
        asyncio.get_running_loop().call_later(FAILURE_REPORT_S, stop)
        deadline = threading.Timer(FAILURE_EXIT_S, os._exit, args=(1,))
        deadline.daemon = True
        deadline.start()

    app = create_app(engine, settings, on_engine_failure=on_engine_failure)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    server.run()
    if failed:
        log.error("exiting: the engine failed (%s)", engine.error)
        # Not sys.exit: interpreter shutdown runs atexit handlers that wait on the dead engine's
        # processes (seen: 7 s under load), and the deadline timer's thread is frozen by then.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

from server.settings import EngineSettings, ServerSettings, add_flags, from_args

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
        default=os.environ.get("REMIX_CHECKPOINT") or None,
        help=f"checkpoint directory (env REMIX_CHECKPOINT; default: ./{DEFAULT_CHECKPOINT}, "
        "built first if absent)",
    )
    source.add_argument(
        "--base-model",
        default=None,
        help="instead of a checkpoint: serve this Hugging Face model directory plainly, with no "
        "adapters (the same server without ReMix, for comparisons)",
    )
    p.add_argument("--host", default=os.environ.get("REMIX_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("REMIX_PORT", "8000")))
    p.add_argument(
        "--served-model-name",
        default=os.environ.get("REMIX_SERVED_MODEL_NAME") or None,
        help=f"model name clients use (env REMIX_SERVED_MODEL_NAME; default: '{DEMO_MODEL_NAME}' "
        "for the demo checkpoint, "
        "else the checkpoint directory's name)",
    )
    # The engine's and the server's settings: one flag each, its default from REMIX_<NAME>.
    add_flags(p, EngineSettings)
    add_flags(p, ServerSettings)
    p.add_argument("--log-level", default=os.environ.get("REMIX_LOG_LEVEL", "info"))
    return p


def resolve_checkpoint(arg: str | None) -> Path:
    """The checkpoint to serve; with no argument ./demo-checkpoint. A demo checkpoint
    (a directory named demo-checkpoint) that does not exist yet is built first."""
    path = Path(arg if arg is not None else DEFAULT_CHECKPOINT)
    if path.name == DEFAULT_CHECKPOINT and not path.exists():
        log.info("%s is absent: building the demo checkpoint there", path)
        log.info("(trains a small model on this machine, about 3 minutes)")
        from remix_infer.train.demo import run_demo

        run_demo(path)
        log.info("demo checkpoint built in ./%s", path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(".cache/vllm").resolve()))

    from remix_infer.checkpoint import CheckpointError
    from server.settings import SettingsError

    if args.base_model and not (Path(args.base_model) / "config.json").is_file():
        print(
            f"remix-serve: cannot serve {args.base_model}: no config.json "
            "(--base-model takes a Hugging Face model directory)",
            file=sys.stderr,
        )
        return 2
    try:
        checkpoint = None if args.base_model else resolve_checkpoint(args.checkpoint)
        from server.engine_client import RemixEngine

        engine = RemixEngine(
            checkpoint, from_args(EngineSettings, args), base_model=args.base_model
        )
    except CheckpointError as e:
        print(
            f"remix-serve: cannot serve {args.checkpoint or DEFAULT_CHECKPOINT}: {e}",
            file=sys.stderr,
        )
        return 2
    except SettingsError as e:
        print(f"remix-serve: {e}", file=sys.stderr)
        return 2
    if engine.settings.headless:
        log.info("loaded %s; headless: this host runs workers only", engine.describe())
        engine.run_headless()
        return 0

    name = args.served_model_name
    if name is None:
        name = engine.path.resolve().name
        name = DEMO_MODEL_NAME if name == DEFAULT_CHECKPOINT else name
    log.info("loaded %s", engine.describe())
    log.info(
        "serving it as '%s' on http://%s:%d/v1 (API key %s); starting the engine...",
        name,
        args.host,
        args.port,
        "required" if args.api_key else "not required",
    )

    return serve(engine, from_args(ServerSettings, args, served_model_name=name), args)


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

"""`remix-serve`: serve a ReMix checkpoint over an OpenAI-compatible HTTP API.

vLLM spawns its engine-core and worker processes, so this module only does work under
`main()` (called from `if __name__ == "__main__"` or the console script).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

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
        "--api-key",
        default=os.environ.get("REMIX_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1 (env REMIX_API_KEY)",
    )
    p.add_argument(
        "--served-model-name",
        default=os.environ.get("REMIX_SERVED_MODEL_NAME") or None,
        help=f"model name clients use (env REMIX_SERVED_MODEL_NAME; default: '{DEMO_MODEL_NAME}' "
        "for the demo checkpoint, "
        "else the checkpoint directory's name)",
    )
    # Engine flags also read REMIX_<FLAG> (the container images are configured by environment);
    # argparse converts a string default with the flag's type.
    p.add_argument(
        "--max-model-len",
        type=int,
        default=os.environ.get("REMIX_MAX_MODEL_LEN") or None,
        help="context length (tokens)",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=os.environ.get("REMIX_TENSOR_PARALLEL_SIZE") or "1",
    )
    p.add_argument(
        "--dtype",
        default=os.environ.get("REMIX_DTYPE") or "auto",
        help="auto, float32, bfloat16, float16",
    )
    p.add_argument(
        "--kv-cache-gib",
        type=int,
        default=os.environ.get("REMIX_KV_CACHE_GIB") or None,
        help="KV cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE; default 4)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=os.environ.get("REMIX_GPU_MEMORY_UTILIZATION") or None,
        help="fraction of device memory",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=os.environ.get("REMIX_MAX_NUM_SEQS") or None,
        help="sequences batched at once",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=os.environ.get("REMIX_MAX_NUM_BATCHED_TOKENS") or None,
        help="tokens in one engine step",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=os.environ.get("REMIX_MAX_QUEUE") or "256",
        help="requests admitted at once (running + waiting); past it: 429 with Retry-After",
    )
    p.add_argument("--max-n", type=int, default=16, help="largest n (choices per prompt)")
    p.add_argument("--enforce-eager", action="store_true", help="no compiled mode (faster start)")
    p.add_argument("--seed", type=int, default=0)
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

    if args.base_model and not (Path(args.base_model) / "config.json").is_file():
        print(
            f"remix-serve: cannot serve {args.base_model}: no config.json "
            "(--base-model takes a Hugging Face model directory)",
            file=sys.stderr,
        )
        return 2
    try:
        checkpoint = None if args.base_model else resolve_checkpoint(args.checkpoint)
        from server.engine import EngineSettings, RemixEngine

        engine = RemixEngine(
            checkpoint,
            EngineSettings(
                max_model_len=args.max_model_len,
                tensor_parallel_size=args.tensor_parallel_size,
                dtype=args.dtype,
                kv_cache_gib=args.kv_cache_gib,
                gpu_memory_utilization=args.gpu_memory_utilization,
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enforce_eager=args.enforce_eager,
                seed=args.seed,
            ),
            base_model=args.base_model,
        )
    except CheckpointError as e:
        print(
            f"remix-serve: cannot serve {args.checkpoint or DEFAULT_CHECKPOINT}: {e}",
            file=sys.stderr,
        )
        return 2

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

    import uvicorn

    from server.app import ServerSettings, create_app

    app = create_app(
        engine,
        ServerSettings(
            served_model_name=name,
            api_key=args.api_key,
            max_queue=args.max_queue,
            max_n=args.max_n,
        ),
        exit_on_engine_failure=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=30,
    )
    if engine.error is not None:
        log.error("the engine failed to start: %s", engine.error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

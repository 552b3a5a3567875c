"""The service's settings, each spelled once: its field here gives the `remix-serve` flag
(`--max-queue`), the environment variable that sets its default (`REMIX_MAX_QUEUE`: the
container images are configured by environment; a flag wins over its variable), its type and
its help text."""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any


def setting(default: Any, help: str, *, engine_arg: bool = False, flag: bool = True) -> Any:
    """A dataclass field that is also a command-line flag. engine_arg: passed as is to vLLM's
    AsyncEngineArgs under the same name (when not None)."""
    return field(default=default, metadata={"help": help, "engine_arg": engine_arg, "flag": flag})


@dataclass
class EngineSettings:
    """Serving settings for the engine (everything except what the checkpoint decides)."""

    max_model_len: int | None = setting(None, "context length (tokens)", engine_arg=True)
    tensor_parallel_size: int = setting(1, "tensor-parallel ranks", engine_arg=True)
    dtype: str = setting("auto", "auto (the checkpoint's), float32, bfloat16, float16")
    kv_cache_gib: int | None = setting(
        None, "KV cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE; default 4)"
    )
    gpu_memory_utilization: float | None = setting(None, "fraction of device memory")
    max_num_seqs: int | None = setting(None, "sequences batched at once", engine_arg=True)
    max_num_batched_tokens: int | None = setting(None, "tokens in one engine step", engine_arg=True)
    enforce_eager: bool = setting(False, "no compiled mode (faster start)", engine_arg=True)
    seed: int = setting(0, "the engine's random seed", engine_arg=True)
    extra: dict[str, Any] = field(default_factory=dict, metadata={"flag": False})  # more args

    def engine_args(self) -> dict[str, Any]:
        """The settings that vLLM takes under their own names."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.metadata.get("engine_arg") and getattr(self, f.name) is not None
        }


@dataclass
class ServerSettings:
    served_model_name: str = setting("remix-demo", "model name clients use", flag=False)
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' on /v1")
    max_queue: int = setting(
        256, "requests admitted at once (running + waiting); past it: 429 with Retry-After"
    )
    max_n: int = setting(16, "largest n (choices per prompt)")
    max_body_mib: int = setting(16, "largest request body in MiB; past it: 413")
    retry_after_s: int = setting(1, "Retry-After of a 429 (seconds)", flag=False)

    @property
    def max_body_bytes(self) -> int:
        return self.max_body_mib << 20


def _flag_fields(cls: type) -> list[Field]:
    return [f for f in fields(cls) if f.metadata.get("flag", False)]


def _env_default(f: Field) -> Any:
    raw = os.environ.get(f"REMIX_{f.name.upper()}") or None
    if raw is None:
        return f.default if f.default is not MISSING else None
    if f.default is False:
        return raw.lower() in ("1", "true", "yes", "on")
    return raw  # argparse converts a string default with the flag's type


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per setting of `cls`, its default read from REMIX_<NAME>."""
    for f in _flag_fields(cls):
        name = "--" + f.name.replace("_", "-")
        env = f"REMIX_{f.name.upper()}"
        help = f"{f.metadata['help']} (env {env})"
        if f.default is False:
            parser.add_argument(name, action="store_true", default=_env_default(f), help=help)
            continue
        kind = str(f.type).split(" | ")[0]
        convert = {"int": int, "float": float}.get(kind, str)
        parser.add_argument(name, type=convert, default=_env_default(f), help=help)


def from_args(cls: type, args: argparse.Namespace, **more: Any) -> Any:
    """An instance of `cls` from the parsed flags that add_flags made (and `more`)."""
    return cls(**{f.name: getattr(args, f.name) for f in _flag_fields(cls)}, **more)

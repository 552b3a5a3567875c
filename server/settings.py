"""The service's settings, each spelled once: its field here gives the `remix-serve` flag
(`--max-queue`), the environment variable that sets its default (`REMIX_MAX_QUEUE`: the
container images are configured by environment; a flag wins over its variable), its type and
its help text."""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from remix_infer.checkpoint import RemixCheckpoint


def setting(
    default: Any,
    help: str,
    *,
    engine_arg: bool = False,
    flag: bool = True,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field that is also a command-line flag. engine_arg: passed as is to vLLM's
    AsyncEngineArgs under the same name (when not None); choices: the values the flag takes."""
    metadata = {"help": help, "engine_arg": engine_arg, "flag": flag, "choices": choices}
    return field(default=default, metadata=metadata)


KERNELS = ("auto", "triton", "torch")  # --remix-kernel: remix_infer.vllm_plugin.model reads it


class SettingsError(ValueError):
    """Settings that cannot work together; the message names the flags."""


@dataclass
class EngineSettings:
    """Serving settings for the engine (everything except what the checkpoint decides)."""

    max_model_len: int | None = setting(None, "context length (tokens)", engine_arg=True)
    tensor_parallel_size: int = setting(1, "tensor-parallel ranks", engine_arg=True)
    # Beyond one engine process group on one host: vLLM's own distributed runtime
    # (deploy/README.md, "Multi-node serving").
    pipeline_parallel_size: int = setting(
        1, "pipeline stages: the layers split over this many ranks (or hosts)", engine_arg=True
    )
    data_parallel_size: int = setting(
        1,
        "engine replicas inside this one server (vLLM data parallelism, one host)",
        engine_arg=True,
    )
    distributed_executor_backend: str | None = setting(
        None,
        "how the ranks run: mp (processes; across hosts with --nnodes) or ray (a Ray cluster); "
        "default: mp",
        engine_arg=True,
        choices=("mp", "ray"),
    )
    nnodes: int = setting(
        1,
        "hosts the mp backend spans (rank 0 serves HTTP, the others run --headless)",
        engine_arg=True,
    )
    node_rank: int = setting(0, "this host's rank among --nnodes", engine_arg=True)
    master_addr: str = setting(
        "127.0.0.1",
        "the rank-0 host's address, reachable from every host (--nnodes > 1)",
        engine_arg=True,
    )
    master_port: int = setting(29501, "the rank-0 host's torch.distributed port", engine_arg=True)
    headless: bool = setting(False, "run this host's workers only, no HTTP (--node-rank > 0)")
    dtype: str = setting("auto", "auto (the checkpoint's), float32, bfloat16, float16")
    kv_cache_gib: int | None = setting(
        None, "KV cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE; default 4)"
    )
    gpu_memory_utilization: float | None = setting(None, "fraction of device memory")
    max_num_seqs: int | None = setting(None, "sequences batched at once", engine_arg=True)
    max_num_batched_tokens: int | None = setting(None, "tokens in one engine step", engine_arg=True)
    enforce_eager: bool = setting(False, "no compiled mode (faster start)", engine_arg=True)
    seed: int = setting(0, "the engine's random seed", engine_arg=True)
    max_checkpoints: int | None = setting(
        None,
        "checkpoint slots, sized at start (default: the number of --checkpoint flags, plus 4 "
        "with --checkpoint-dir); slots left free take checkpoints loaded while serving",
    )
    remix_kernel: str = setting(
        "auto",
        "the ReMix layer's kernel: auto (Triton on a GPU, checked at start; numba or torch on "
        "CPU), triton, or torch (the plain-torch path, for a GPU whose Triton kernel fails its "
        "start-up check)",
        choices=KERNELS,
    )
    extra: dict[str, Any] = field(default_factory=dict, metadata={"flag": False})  # more args

    @property
    def ranks(self) -> int:
        """Worker processes of the engine, over all hosts."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    def check(self) -> None:
        """Refuse combinations that cannot work, before any engine process starts."""
        sizes = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "nnodes")
        for name in (*sizes, "max_checkpoints"):
            value = getattr(self, name)  # max_checkpoints None: as many as given
            if value is not None and value < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1")
        if self.remix_kernel not in KERNELS:  # argparse checks the flag, not its variable
            raise SettingsError(
                f"--remix-kernel {self.remix_kernel} (or REMIX_REMIX_KERNEL): expected "
                + ", ".join(KERNELS)
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise SettingsError(
                f"--node-rank {self.node_rank} must be between 0 and --nnodes - 1 ({self.nnodes})"
            )
        if self.nnodes > 1:
            self._check_hosts()
        elif self.headless:
            raise SettingsError("--headless runs a host other than rank 0: it needs --nnodes > 1")
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise SettingsError(
                f"--distributed-executor-backend {self.distributed_executor_backend}: "
                "expected mp or ray"
            )
        if self.distributed_executor_backend == "ray":
            self._check_ray()

    def check_checkpoint(self, checkpoint: RemixCheckpoint) -> None:
        """Refuse settings this checkpoint cannot be served with, before any engine starts
        (the model class checks again inside the engine, for engines built another way)."""
        scope = checkpoint.config.routing_scope
        if scope == "shared" and self.pipeline_parallel_size > 1:
            raise SettingsError(
                f"{checkpoint.path}: routing_scope 'shared' cannot be served with "
                f"--pipeline-parallel-size {self.pipeline_parallel_size} (its one router reads "
                "the first layer's input, which only the first stage has); use "
                "--tensor-parallel-size or --data-parallel-size instead"
            )

    def _check_hosts(self) -> None:
        if self.headless != (self.node_rank > 0):
            raise SettingsError(
                "with --nnodes > 1, rank 0 serves HTTP and every other host runs --headless: "
                f"--node-rank {self.node_rank} needs "
                + ("--headless" if self.node_rank > 0 else "no --headless")
            )
        if self.distributed_executor_backend == "ray":
            raise SettingsError(
                "--nnodes is the mp backend's way across hosts; with "
                "--distributed-executor-backend ray, the Ray cluster spans the hosts: start "
                "remix-serve on the Ray head only, without --nnodes"
            )
        if self.data_parallel_size > 1:
            raise SettingsError(
                "--data-parallel-size > 1 with --nnodes > 1 is not supported: run one server "
                "per group of hosts behind a load balancer (deploy/README.md)"
            )
        if self.ranks % self.nnodes:
            raise SettingsError(
                f"--nnodes {self.nnodes} must divide the ranks: --tensor-parallel-size x "
                f"--pipeline-parallel-size = {self.ranks}"
            )

    def _check_ray(self) -> None:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise SettingsError(
                "--distributed-executor-backend ray needs Ray: pip install 'remix-infer[ray]'"
            )
        if self.data_parallel_size > 1:
            raise SettingsError(
                "--data-parallel-size > 1 runs on the mp backend only: its engines are local "
                "processes, not Ray workers"
            )

    def engine_args(self) -> dict[str, Any]:
        """The settings that vLLM takes under their own names."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.metadata.get("engine_arg") and getattr(self, f.name) is not None
        }


@dataclass
class ServerSettings:
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' on /v1")
    max_queue: int = setting(
        256, "requests admitted at once (running + waiting); past it: 429 with Retry-After"
    )
    max_n: int = setting(16, "largest n (choices per prompt)")
    max_body_mib: int = setting(16, "largest request body in MiB; past it: 413")
    retry_after_s: int = setting(1, "Retry-After of a 429 (seconds)", flag=False)
    # The checkpoint store (server/store.py); --checkpoint-dir is a repeatable flag of the CLI.
    checkpoint_dirs: list[Path] = field(default_factory=list, metadata={"flag": False})
    max_host_checkpoints: int | None = setting(
        None,
        "checkpoints whose read tensors stay in host memory, so a reload skips the disk "
        "(default: a tenth of the host's memory over one checkpoint's size, at most 256; 0: none)",
    )
    load_timeout_s: float = setting(
        30.0,
        "how long a request waits for its checkpoint's load when every slot is busy; past it: "
        "503 with Retry-After",
    )
    rescan_interval_s: float = setting(5.0, "seconds between --checkpoint-dir scans", flag=False)

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
        choices = f.metadata.get("choices")
        parser.add_argument(name, type=convert, default=_env_default(f), choices=choices, help=help)


def from_args(cls: type, args: argparse.Namespace, **more: Any) -> Any:
    """An instance of `cls` from the parsed flags that add_flags made (and `more`)."""
    return cls(**{f.name: getattr(args, f.name) for f in _flag_fields(cls)}, **more)

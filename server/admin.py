"""POST /v1/load_checkpoint and /v1/unload_checkpoint: checkpoints put into and taken out of the
engine's slots while it serves.

Admin only: refused (403) unless the server requires an API key, as vLLM offers its
/v1/load_lora_adapter only when runtime updates are enabled; without a key any client could
change what the server serves, or read files by path. A checkpoint is fully validated on the
host (its own files, and check_slot_compatible against the slots' template) before any engine
call, so a bad one never touches a slot. One load or unload at a time.

Unloading waits for the checkpoint's requests in flight, up to the request's `timeout_s`
(default 30 s), refusing new requests for it meanwhile (404, "being unloaded"); past the
timeout it is refused with 409 and the checkpoint serves on. Requests to other models are not
affected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from remix_infer.checkpoint import RemixCheckpoint, load_checkpoint
from remix_infer.vllm_plugin.engine import check_slot_compatible
from server.engine_client import RemixEngine
from server.errors import APIError
from server.models import ServedModel
from server.protocol import CheckpointInfo, LoadCheckpointRequest, UnloadCheckpointRequest
from server.settings import ServerSettings

log = logging.getLogger("remix_serve.admin")


class CheckpointAdmin:
    def __init__(self, engine: RemixEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.lock = asyncio.Lock()  # one load or unload at a time

    def require_admin(self) -> None:
        if not self.settings.api_key:
            raise APIError(
                403,
                "Loading and unloading checkpoints needs an API key: start remix-serve with "
                "--api-key (REMIX_API_KEY); without one, any client could change what this "
                "server serves",
                type="permission_error",
                code="admin_disabled",
            )
        if not self.engine.ready:
            raise APIError(
                503,
                "The engine is not ready",
                type="server_error",
                code="engine_not_ready",
                headers={"Retry-After": "5"},
            )
        if self.engine.remix_config is None:
            raise APIError(
                400,
                "This server serves a plain base model (--base-model): it has no checkpoint slots",
                code="no_checkpoint_slots",
            )

    def validate(self, path: str) -> RemixCheckpoint:
        """The checkpoint at `path`, read and checked against the slots' template (in a worker
        thread: it reads every tensor). 400 naming the file and field if it cannot serve."""
        try:
            checkpoint = load_checkpoint(path)
            check_slot_compatible(self.engine.template, checkpoint)
        except ValueError as e:  # CheckpointError is one
            raise APIError(400, str(e), param="path", code="invalid_checkpoint") from None
        return checkpoint

    async def load(self, body: LoadCheckpointRequest) -> CheckpointInfo:
        self.require_admin()
        models = self.engine.models
        async with self.lock:
            t0 = time.perf_counter()
            if body.name in models.models:
                raise APIError(
                    409,
                    f"The model '{body.name}' is already served: unload it first, or pick "
                    "another name",
                    param="name",
                    code="model_exists",
                )
            slot = models.free_slot()
            if slot is None:
                raise APIError(
                    409,
                    f"All {models.max_slots} checkpoint slots are in use (--max-checkpoints "
                    f"{models.max_slots}): unload a checkpoint first",
                    code="no_free_slot",
                )
            checkpoint = await asyncio.to_thread(self.validate, body.path)
            path = Path(checkpoint.path).resolve()
            try:
                await self.engine.load_slot(slot, path)
            except ValueError as e:  # the worker's own check
                raise APIError(400, str(e), param="path", code="invalid_checkpoint") from None
            model = models.add(body.name, slot, path, checkpoint.config)
        return self._info(model, "loaded", t0)

    async def unload(self, body: UnloadCheckpointRequest) -> CheckpointInfo:
        self.require_admin()
        models = self.engine.models
        async with self.lock:
            t0 = time.perf_counter()
            model = models.resolve(body.name)  # 404 for a name not served
            if model.is_base:
                raise APIError(
                    400,
                    f"'{body.name}' is the base model: only checkpoints can be unloaded",
                    param="name",
                    code="invalid_value",
                )
            await self._drain(model, body.timeout_s)
            try:
                await self.engine.unload_slot(model.slot)
            except BaseException:
                model.unloading = False  # still in its slot as far as anyone can tell
                raise
            models.remove(model.name)
        return self._info(model, "unloaded", t0)

    async def _drain(self, model: ServedModel, timeout_s: float) -> None:
        """Refuse new requests for `model` and wait for those in flight; 409 (and `model`
        serves on) if they are not done within timeout_s."""
        model.unloading = True
        try:
            if not model.idle.is_set():
                await asyncio.wait_for(model.idle.wait(), timeout_s)
        except TimeoutError:
            model.unloading = False
            raise APIError(
                409,
                f"'{model.name}' still has {model.in_flight} request(s) in flight after "
                f"{timeout_s:g} s; it stays loaded (retry, or give a larger timeout_s)",
                param="timeout_s",
                code="checkpoint_busy",
            ) from None

    def _info(self, model: ServedModel, status: str, t0: float) -> CheckpointInfo:
        seconds = round(time.perf_counter() - t0, 3)
        log.info(
            "%s '%s' (slot %d, %s) in %.2f s", status, model.name, model.slot, model.path, seconds
        )
        return CheckpointInfo(
            name=model.name, path=str(model.path), slot=model.slot, status=status, seconds=seconds
        )

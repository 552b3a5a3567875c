"""POST /v1/load_checkpoint and /v1/unload_checkpoint: checkpoints put into and taken out of the
engine's slots while it serves.

Admin only: refused (403) unless the server requires an API key, as vLLM offers its
/v1/load_lora_adapter only when runtime updates are enabled; without a key any client could
change what the server serves, or read files by path. A checkpoint is fully validated on the
host (its own files, and check_slot_compatible against the slots' template) before any engine
call, so a bad one never touches a slot. One load or unload at a time (the store's lock).
Admin loads are pinned: the store never evicts them; a --checkpoint-dir folder can be pinned
(loaded with its own name and path) and unpinned (unloaded: it stays servable).

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
from server.store import CheckpointStore, Folder

log = logging.getLogger("remix_serve.admin")


class CheckpointAdmin:
    def __init__(
        self, engine: RemixEngine, settings: ServerSettings, store: CheckpointStore
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.store = store

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
        """Load a checkpoint pinned (never evicted) into a free slot, or the slot of the least
        recently used idle folder checkpoint. A --checkpoint-dir folder named with its own path
        is pinned where it is."""
        self.require_admin()
        models, store = self.engine.models, self.store
        async with store.lock:
            t0 = time.perf_counter()
            folder = store.folders.get(body.name)
            if folder is not None and folder.path == Path(body.path).resolve():
                return self._info(await self._pin(folder), "loaded", t0)
            if body.name in models.models or folder is not None:
                raise APIError(
                    409,
                    f"The model '{body.name}' is already served: unload it first, or pick "
                    "another name",
                    param="name",
                    code="model_exists",
                )
            checkpoint = await asyncio.to_thread(self.validate, body.path)
            path = Path(checkpoint.path).resolve()
            try:
                model = await store.place(body.name, path, checkpoint.config, pinned=True)
            except ValueError as e:  # the worker's own check
                raise APIError(400, str(e), param="path", code="invalid_checkpoint") from None
            if model is None:
                raise self._no_slot()
        return self._info(model, "loaded", t0)

    async def _pin(self, folder: Folder) -> ServedModel:
        model = self.engine.models.models.get(folder.name)
        if model is not None and model.unloading:
            raise APIError(409, f"'{folder.name}' is being unloaded: retry", param="name",
                           code="checkpoint_busy")  # fmt: skip
        if model is None:
            if folder.error is not None:
                raise APIError(400, folder.error, param="path", code="invalid_checkpoint")
            model = await self.store.place(folder.name, folder.path, folder.config, pinned=True)
            if model is None:
                raise self._no_slot()
        model.pinned = True
        return model

    def _no_slot(self) -> APIError:
        slots = self.engine.models.max_slots
        return APIError(
            409,
            f"All {slots} checkpoint slots hold pinned checkpoints or ones with requests in "
            f"flight (--max-checkpoints {slots}): unload a checkpoint first",
            code="no_free_slot",
        )

    async def unload(self, body: UnloadCheckpointRequest) -> CheckpointInfo:
        """Empty a checkpoint's slot once its requests are done. A --checkpoint-dir folder stays
        servable (unpinned: loaded again on its next request)."""
        self.require_admin()
        models = self.engine.models
        async with self.store.lock:
            t0 = time.perf_counter()
            model = models.models.get(body.name)
            if model is None or model.unloading:
                await self.store.resolve(body.name)  # 404 (or 400) for a name not loaded
                raise APIError(409, f"'{body.name}' is not in a slot", param="name",
                               code="not_loaded")  # fmt: skip
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

"""The checkpoint store: the one place that decides which models this server serves and which
of them sit in the engine's checkpoint slots. The engine's slots only hold what they are told.

    servable   every folder under a --checkpoint-dir holding a remix_config.json (named after the
               folder), the --checkpoint models, admin-loaded ones and the base model
    loaded     in a slot (the ModelTable of server/models.py); --checkpoint and admin-loaded
               models are pinned there, folders are loaded on first use and evicted least
               recently used once no request is in flight for them
    host       the workers keep a folder's read tensors in host memory (up to
               --max-host-checkpoints, least recently used dropped first), so a reload skips
               the disk

A request for a folder that is not loaded starts its load (requests for one folder share it)
and waits; when every slot holds a pinned or busy checkpoint it waits for one to free, bounded
by --load-timeout-s, then gets 503 with Retry-After. Folders are checked from their headers
(config, base model, tensor names and shapes; remix_infer.checkpoint.read_checkpoint_header)
against the slots' template before anything loads: an invalid one answers 400 naming the file
and field, logged once. The directories are scanned again when a request names a model the
store does not know, when /v1/models is read, and every few seconds (new folders serve without
a restart; removed ones stop being listed and are unloaded once idle). A request names a
folder, never a path: names are checked before any file is read, and folders whose files
resolve outside their directory (symlinks) are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from remix_infer.checkpoint import read_checkpoint_header
from remix_infer.config import ADAPTERS_FILE, CONFIG_FILE, RemixConfig
from remix_infer.vllm_plugin.engine import check_slot_compatible
from server.errors import APIError
from server.models import ModelTable, ServedModel

if TYPE_CHECKING:
    from server.engine_client import RemixEngine
    from server.metrics import StoreMetrics
    from server.settings import ServerSettings

log = logging.getLogger("remix_serve.store")

HOST_MEMORY_SHARE = 0.1  # the host tier's default: a tenth of the host's memory...
MAX_HOST_CHECKPOINTS = 256  # ...in checkpoints of the template's size, at most this many
NAMES_IN_MESSAGES = 20  # a 404 lists this many served names, then how many more


def valid_folder_name(name: str) -> bool:
    """A name that can only mean a folder directly under a --checkpoint-dir: no path separator,
    no '.' or '..', no hidden folder (a copy in progress can be written as .NAME, then renamed)."""
    return (
        bool(name)
        and not name.startswith(".")
        and not any(c in "/\\\0," or c.isspace() for c in name)
    )


def default_host_checkpoints(checkpoint_bytes: int, memory_bytes: int | None = None) -> int:
    """--max-host-checkpoints' default: HOST_MEMORY_SHARE of the host's memory over one
    checkpoint's size, between 1 and MAX_HOST_CHECKPOINTS."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = int(memory_bytes * HOST_MEMORY_SHARE) // max(checkpoint_bytes, 1)
    return max(1, min(MAX_HOST_CHECKPOINTS, fits))


def folders_under(root: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The checkpoint folders directly under `root`: ({name: resolved path}, {name: why it is
    refused}). A folder (or its files) reached through a symlink leading out of root is refused."""
    found: dict[str, Path] = {}
    refused: dict[str, str] = {}
    real_root = root.resolve()
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:  # the directory went away: nothing under it is servable
        return found, refused
    for entry in entries:
        if not valid_folder_name(entry.name):
            continue
        real = Path(entry.path).resolve()
        if not (real / CONFIG_FILE).is_file():
            continue
        files = (real, (real / CONFIG_FILE).resolve(), (real / ADAPTERS_FILE).resolve())
        if not all(f.is_relative_to(real_root) for f in files):
            refused[entry.name] = f"{entry.path}: refused: a symlink leading out of {root}"
            continue
        found[entry.name] = real
    return found, refused


@dataclass(eq=False)
class Folder:
    """One checkpoint folder under a --checkpoint-dir, checked from its header."""

    name: str
    path: Path
    version: str  # its files' modification times: a changed folder is checked (and read) again
    config: RemixConfig | None = None
    error: str | None = None  # why it cannot be served (400 for requests naming it)
    waiting: int = 0  # requests waiting for its load

    @property
    def host_key(self) -> str:
        return f"{self.path}@{self.version}"


def folder_version(path: Path) -> str:
    stats = [(path / f).stat().st_mtime_ns for f in (CONFIG_FILE, ADAPTERS_FILE)
             if (path / f).exists()]  # fmt: skip
    return ".".join(map(str, stats))


class CheckpointStore:
    """The servable models and their places (slots, host tier); see the module's docstring."""

    def __init__(
        self,
        engine: RemixEngine,
        settings: ServerSettings,
        metrics: StoreMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.table: ModelTable = engine.models
        self.dirs = [Path(d) for d in settings.checkpoint_dirs]
        self.folders: dict[str, Folder] = {}
        self.host: OrderedDict[str, str] = OrderedDict()  # host-tier key -> name, oldest first
        self.host_capacity = self._host_capacity()
        self.lock = asyncio.Lock()  # one engine load or unload at a time (admin.py shares it)
        self.waiting = 0  # requests waiting for a load
        self._loads: dict[str, asyncio.Task] = {}
        self._changed = asyncio.Event()
        self._scan: asyncio.Task | None = None
        self._scans = 0
        self._logged: set[str] = set()
        if self.dirs:
            self._apply(*self._scan_dirs())

    def _host_capacity(self) -> int:
        if self.settings.max_host_checkpoints is not None:
            return self.settings.max_host_checkpoints
        template = self.engine.template
        if template is None or not self.dirs:
            return 0
        size = sum(t.numel() * t.element_size() for t in template.tensors.values())
        size = size or (Path(template.path) / ADAPTERS_FILE).stat().st_size
        return default_host_checkpoints(size)

    # -- the directories ----------------------------------------------------------------------

    def _scan_dirs(self) -> tuple[dict[str, Folder], list[str]]:
        """Every folder of the directories, checked (headers read only for new or changed
        ones), and the problems found. Blocking: run in a thread while serving."""
        folders: dict[str, Folder] = {}
        problems: list[str] = []
        for root in self.dirs:
            found, refused = folders_under(root)
            problems += refused.values()
            for name, path in found.items():
                if name in folders or (
                    name in self.table.models and self.table.models[name].pinned
                ):
                    problems.append(f"{path}: not served: the model '{name}' is served already")
                    continue
                folders[name] = self._checked(name, path)
        return folders, problems

    def _checked(self, name: str, path: Path) -> Folder:
        try:
            version = folder_version(path)
        except OSError as e:
            return Folder(name, path, "", error=f"{path}: {e}")
        old = self.folders.get(name)
        if old is not None and old.path == path and old.version == version:
            return old
        folder = Folder(name, path, version)
        try:
            header = read_checkpoint_header(path)
            check_slot_compatible(self.engine.template, header)
            folder.config = header.config
        except ValueError as e:  # CheckpointError is one
            folder.error = str(e)
        return folder

    def _apply(self, folders: dict[str, Folder], problems: list[str]) -> None:
        for message in problems + [f.error for f in folders.values() if f.error]:
            self._log_once(message)
        self.folders = folders
        for model in self.table.models.values():
            if not model.pinned and self._removed(model):
                model.unloading = True  # new requests: 404; unloaded once idle (reap)

    def _removed(self, model: ServedModel) -> bool:
        folder = self.folders.get(model.name)
        return folder is None or folder.path != model.path

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            log.warning("%s", message)

    async def rescan(self) -> None:
        """Scan the directories again, or wait for a scan that started after this call."""
        if not self.dirs:
            return
        arrived = self._scans
        while True:
            if self._scan is not None and not self._scan.done():
                newer = self._scans > arrived
                await asyncio.shield(self._scan)
                if newer:
                    return
                continue
            self._scans += 1
            self._scan = asyncio.ensure_future(self._scan_now())

    async def _scan_now(self) -> None:
        self._apply(*await asyncio.to_thread(self._scan_dirs))

    async def run(self) -> None:
        """Rescan every rescan_interval_s and unload the removed folders' models once idle."""
        while self.dirs:
            await asyncio.sleep(self.settings.rescan_interval_s)
            try:
                await self.rescan()
                if self.engine.ready:
                    await self.reap()
            except Exception:
                log.exception("scanning %s failed", ", ".join(map(str, self.dirs)))

    async def reap(self) -> None:
        """Unload, once idle, the loaded models whose folder was removed (or now holds another
        checkpoint); new requests for them are refused meanwhile."""
        for model in list(self.table.models.values()):
            if model.pinned or not self._removed(model):
                continue
            model.unloading = True
            if model.in_flight == 0 and model.pending == 0:
                async with self.lock:
                    if self.table.models.get(model.name) is model:
                        await self._evict(model)
        self._notify()

    # -- what a request names -----------------------------------------------------------------

    def _lookup(self, name: str) -> ServedModel | Folder | None:
        model = self.table.models.get(name)
        if model is not None and not model.unloading:
            return model
        return self.folders.get(name)

    def names(self) -> list[str]:
        return [entry.name for entry, _, _ in self.listed()]

    async def resolve(self, name: str | None) -> ServedModel | Folder:
        """What a request's `model` names: a loaded model or a folder to load (checkout). 404
        for a name not served, 400 for an invalid folder; no name: the only model served."""
        if name is None:
            listed = self.listed()
            if len(listed) == 1:
                return listed[0][0]
            raise APIError(
                400,
                f"model is required: this server serves {self._names_text()}",
                param="model",
                code="model_required",
            )
        found = self._lookup(name)
        if found is None and self.dirs and valid_folder_name(name):
            await self.rescan()  # a folder added since the last scan serves at once
            found = self._lookup(name)
        if found is None:
            model = self.table.models.get(name)
            why = "is being unloaded" if model is not None else "does not exist"
            raise APIError(
                404,
                f"The model '{name}' {why} (this server serves {self._names_text()})",
                param="model",
                code="model_not_found",
            )
        if isinstance(found, Folder) and found.error is not None:
            raise APIError(400, found.error, param="model", code="invalid_checkpoint")
        return found

    def _names_text(self) -> str:
        names = [f"'{n}'" for n in self.names()]
        if not names:
            return "no model right now"
        more = len(names) - NAMES_IN_MESSAGES
        return ", ".join(names[:NAMES_IN_MESSAGES]) + (f" and {more} more" if more > 0 else "")

    def listed(self) -> list[tuple[ServedModel | Folder, str, int | None]]:
        """(model, status, slot) of every servable model: the checkpoints in slots (slot
        order), the valid folders not in one (by name), then the base model. Status: loaded,
        host (its tensors in host memory) or available."""
        out: list[tuple[ServedModel | Folder, str, int | None]] = []
        base = []
        for model in self.table.listed():
            if model.unloading and model.name not in self.folders:
                continue
            if model.is_base:
                base.append((model, "loaded", None))
            elif not model.unloading:
                out.append((model, "loaded", model.slot))
        shown = {entry.name for entry, _, _ in out}
        for name, folder in sorted(self.folders.items()):
            if name not in shown and folder.error is None:
                status = "host" if folder.host_key in self.host else "available"
                out.append((folder, status, None))
        return out + base

    # -- slots --------------------------------------------------------------------------------

    async def checkout(self, item: ServedModel | Folder) -> ServedModel:
        """`item`'s model in a slot, counted in flight (give it back with `release`): loaded
        first if it is not, waiting for a slot up to --load-timeout-s (then 503)."""
        if isinstance(item, ServedModel):  # nothing was awaited since resolve: still loaded
            self._take(item, hit=True)
            return item
        deadline = time.monotonic() + self.settings.load_timeout_s
        self._waiting(+1)
        try:
            while True:
                model = self._lookup(item.name)
                if isinstance(model, ServedModel):
                    self._take(model, hit=False)
                    return model
                if model is None:
                    raise APIError(404, f"The model '{item.name}' was removed",
                                   param="model", code="model_not_found")  # fmt: skip
                if time.monotonic() >= deadline:
                    raise self._timeout(item.name)
                claimed = await self._join_load(model, deadline - time.monotonic())
                if claimed is not None:
                    self._count(hit=False)
                    return claimed
                if not isinstance(self._lookup(item.name), ServedModel):
                    await self._wait_change(deadline)
        finally:
            self._waiting(-1)

    def release(self, model: ServedModel) -> None:
        self.table.release(model)
        if model.in_flight == 0 and not model.pinned:
            self._notify()  # an eviction candidate, for requests waiting for a slot

    def _take(self, model: ServedModel, hit: bool) -> None:
        self.table.acquire(model)
        if model.slot >= 0:
            self._count(hit)
            key = self.folders[model.name].host_key if model.name in self.folders else None
            if key in self.host:
                self.host.move_to_end(key)

    def _count(self, hit: bool) -> None:
        if self.metrics is not None:
            (self.metrics.hits if hit else self.metrics.misses).inc()

    def _waiting(self, change: int) -> None:
        self.waiting += change
        if self.metrics is not None:
            self.metrics.waiting.set(self.waiting)

    def _timeout(self, name: str) -> APIError:
        return APIError(
            503,
            f"The model '{name}' could not be loaded within {self.settings.load_timeout_s:g} s: "
            f"all {self.table.max_slots} checkpoint slots hold pinned checkpoints or ones with "
            "requests in flight; retry later",
            type="server_error",
            code="checkpoint_slots_busy",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, deadline: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))

    async def _join_load(self, folder: Folder, timeout: float) -> ServedModel | None:
        """Wait (up to timeout) for `folder`'s load, started here unless one runs; the model,
        already counted in flight for this request, or None (loaded for someone else, or no
        slot could be freed, or timed out: the caller looks again)."""
        task = self._loads.get(folder.name)
        if task is None:
            task = self._loads[folder.name] = asyncio.create_task(self._load(folder))
            task.add_done_callback(lambda t: self._load_done(folder.name, t))
        folder.waiting += 1
        claimed = False
        try:
            with contextlib.suppress(TimeoutError):
                model = await asyncio.wait_for(asyncio.shield(task), timeout)
                if model is not None and model.pending > 0:
                    model.pending -= 1
                    self.table.acquire(model)
                    claimed = True
                    return model
            return None
        finally:
            folder.waiting -= 1
            if not claimed and task.done() and not task.cancelled() and task.exception() is None:
                model = task.result()
                if model is not None and model.pending > 0 and folder.waiting < model.pending:
                    model.pending -= 1  # a waiter that went away gives its claim back
                    self._notify()

    def _load_done(self, name: str, task: asyncio.Task) -> None:
        if self._loads.get(name) is task:
            del self._loads[name]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter got it already

    async def _load(self, folder: Folder) -> ServedModel | None:
        """Put `folder` into a slot (evicting the least recently used idle checkpoint if none is
        free); None when every slot is pinned or busy."""
        async with self.lock:
            old = self.table.models.get(folder.name)
            if old is not None and not old.unloading:
                return old
            if old is not None and (old.in_flight or old.pending):
                return None  # the name's previous checkpoint still serves: once idle
            model = await self.place(
                folder.name, folder.path, folder.config, pinned=False, replacing=old
            )
            if model is not None:
                model.pending = folder.waiting
            return model

    async def place(
        self,
        name: str,
        path: Path,
        config: RemixConfig | None,
        pinned: bool,
        replacing: ServedModel | None = None,
    ) -> ServedModel | None:
        """Load `name` into the slot of `replacing` (the name's previous checkpoint, idle), a
        free slot, or the slot of the least recently used idle unpinned checkpoint; None when
        there is none. Call under `lock`. ValueError: the workers refused the checkpoint (400
        for requests naming a folder)."""
        victim = replacing
        slot = self.table.free_slot() if victim is None else None
        if slot is None:
            victim = victim or self._victim()
            if victim is None:
                return None
            slot = victim.slot
            await self._evict(victim, reloaded=True)
        folder = self.folders.get(name)
        key = folder.host_key if folder is not None and self.host_capacity > 0 else None
        source = "host" if key in self.host else "disk"
        t0 = time.perf_counter()
        try:
            await self.engine.load_slot(slot, path, key, self._host_admit(key, name))
        except Exception as e:
            if victim is not None:  # the evicted checkpoint may still be in the slot
                await self.engine.unload_slot(slot)
            if folder is None or not isinstance(e, ValueError):
                raise
            folder.error = str(e)
            self._log_once(folder.error)
            raise APIError(400, folder.error, param="model", code="invalid_checkpoint") from None
        seconds = time.perf_counter() - t0
        model = self.table.add(name, slot, path, config, pinned=pinned)
        log.info("loaded '%s' into slot %d from %s in %.3f s", name, slot, source, seconds)
        if self.metrics is not None:
            self.metrics.loaded(name, source, seconds)
        self._notify()
        return model

    def _victim(self) -> ServedModel | None:
        """The least recently used loaded checkpoint that may go: unpinned, nothing in flight.
        Marked unloading at once, so no request takes it meanwhile."""
        idle = [
            m
            for m in self.table.models.values()
            if not (m.is_base or m.pinned or m.unloading or m.in_flight or m.pending)
        ]
        if not idle:
            return None
        victim = min(idle, key=lambda m: m.last_used)
        victim.unloading = True
        return victim

    async def _evict(self, model: ServedModel, reloaded: bool = False) -> None:
        """Take `model` out of its slot. reloaded: the caller loads the slot at once, which
        replaces all it holds (routing statistics included), so no unload RPC: it would wait
        for the engine's step in progress, for nothing."""
        model.unloading = True
        if not reloaded:
            try:
                await self.engine.unload_slot(model.slot)
            except BaseException:
                model.unloading = False
                raise
        self.table.remove(model.name)
        log.info("evicted '%s' from slot %d", model.name, model.slot)
        if self.metrics is not None:
            self.metrics.evictions.labels(model.name).inc()
        self._notify()

    def _host_admit(self, key: str | None, name: str) -> list[str]:
        """Record that the workers keep `key` (name's tensors) from the load about to start;
        the keys they are to drop with it: the name's older versions and the least recently
        used copies beyond the capacity. (A load that fails leaves a key the workers lack: the
        next load of it reads the disk and keeps it.)"""
        if key is None:
            return []
        drop = [k for k, n in self.host.items() if n == name and k != key]
        for old in drop:
            del self.host[old]
        self.host[key] = name
        self.host.move_to_end(key)
        while len(self.host) > self.host_capacity:
            drop.append(self.host.popitem(last=False)[0])
        return drop

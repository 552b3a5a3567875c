"""The checkpoint store (server/store.py) in-process against the fake engine (no vLLM process):
folders of a --checkpoint-dir served on first use, LRU eviction that never takes a checkpoint
with a request in flight, shared loads, the host tier, 503 when every slot stays busy, invalid
and removed folders, names that are paths, and the CLI's --checkpoint-dir. The real engine
behind the same store: test_store_server.py."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

import pytest
from helpers.asgi import Reply, call, lifespan
from helpers.fake_engine import FakeEngine
from helpers.models import make_checkpoint, router_variant
from helpers.servers import metric_samples

from remix_infer.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_header
from remix_infer.config import ADAPTERS_FILE
from server.app import create_app
from server.cli import build_engine, build_parser, checkpoints_from_environment
from server.settings import ServerSettings, SettingsError
from server.store import default_host_checkpoints, valid_folder_name


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> tuple[Path, Path]:
    """(template checkpoint, a directory of 5 router variants of it: c0 .. c4)."""
    root = tmp_path_factory.mktemp("store")
    template = make_checkpoint(root / "template", seed=1)
    folder = root / "dir"
    for i in range(5):
        router_variant(template, folder / f"c{i}", seed=i + 1)
    return template, folder


class Store:
    """The app over a FakeEngine: the pinned checkpoint 'pin' in slot 0 of `slots`, and the
    folders of `directory`."""

    def __init__(self, template: Path, directory: Path, slots: int = 3, **settings) -> None:
        self.engine = FakeEngine(
            step_s=0.01, models=("pin",), max_slots=slots, template=load_checkpoint(template)
        )
        settings = {"load_timeout_s": 5.0, "rescan_interval_s": 0.05, **settings}
        self.app = create_app(self.engine, ServerSettings(checkpoint_dirs=[directory], **settings))
        self.store = self.app.state.services.store

    async def complete(self, model: str, max_tokens: int = 2) -> Reply:
        body = {"model": model, "prompt": "ab", "max_tokens": max_tokens}
        return await call(self.app, "POST", "/v1/completions", body)

    async def models(self) -> dict[str, tuple[str, int | None]]:
        data = (await call(self.app, "GET", "/v1/models")).json()["data"]
        return {m["id"]: (m["status"], m["slot"]) for m in data}

    async def metrics(self) -> dict:
        return metric_samples((await call(self.app, "GET", "/metrics")).body.decode())


def run(test, *args, **kwargs) -> None:  # noqa: ANN001
    async def main() -> None:
        server = Store(*args, **kwargs)
        async with lifespan(server.app):
            while not server.engine.ready:
                await asyncio.sleep(0)
            await test(server)

    asyncio.run(main())


def test_folders_load_on_first_use_and_evict_least_recently_used(library):
    template, folder = library

    async def check(s: Store) -> None:
        assert await s.models() == {"pin": ("loaded", 0)} | {
            f"c{i}": ("available", None) for i in range(5)
        }
        for name in ("c0", "c1", "c0"):  # two free slots: c0 and c1 load, c0 is then a hit
            r = await s.complete(name)
            assert r.status == 200 and r.json()["model"] == name, r.body
        assert [(slot, Path(p).name, host) for slot, p, host in s.engine.loads] == [
            (1, "c0", False), (2, "c1", False)
        ]  # fmt: skip
        assert (await s.complete("c2")).status == 200  # evicts c1, the least recently used
        models = await s.models()
        assert models["c2"] == ("loaded", 2) and models["c1"] == ("host", None)
        assert models["c0"] == ("loaded", 1) and models["pin"] == ("loaded", 0)
        assert (await s.complete("c1")).status == 200  # back from the host tier, evicting c0
        assert s.engine.loads[-1] == (1, str(folder.resolve() / "c1"), True)
        samples = await s.metrics()
        loads = {
            (dict(k)["model"], dict(k)["source"]): v
            for (n, k), v in samples.items()
            if n == "remix_checkpoint_loads_total"
        }
        counted = {key: v for key, v in loads.items() if v}
        assert counted == {
            ("c0", "disk"): 1,
            ("c1", "disk"): 1,
            ("c2", "disk"): 1,
            ("c1", "host"): 1,
        }
        assert loads[("pin", "disk")] == 0  # loaded at start: its series exist, at zero
        evictions = {
            dict(k)["model"]: v
            for (n, k), v in samples.items()
            if n == "remix_checkpoint_evictions_total"
        }
        assert evictions == {"c1": 1, "c0": 1, "c2": 0, "pin": 0}
        assert samples[("remix_checkpoint_hits_total", ())] == 1
        assert samples[("remix_checkpoint_misses_total", ())] == 4
        assert samples[("remix_checkpoint_load_seconds_count", ())] == 4

    run(check, template, folder)


def test_in_flight_checkpoints_are_never_evicted_and_a_full_table_times_out(library):
    template, folder = library

    async def check(s: Store) -> None:
        long = asyncio.create_task(s.complete("c0", max_tokens=60))  # about 0.6 s in flight
        while not s.engine.running:
            await asyncio.sleep(0.001)
        # One free slot besides c0's (pin is pinned): c1 takes it, then c2 evicts c1, not c0.
        assert (await s.complete("c1")).status == 200
        assert (await s.complete("c2")).status == 200
        assert (await s.models())["c0"] == ("loaded", 1)
        # Every slot busy (c0 and c2 in flight, pin pinned): c3 waits, then gets 503.
        c2 = asyncio.create_task(s.complete("c2", max_tokens=60))
        await asyncio.sleep(0.05)
        r = await s.complete("c3")
        assert r.status == 503 and r.headers["retry-after"] == "1", r.body
        assert r.json()["error"]["code"] == "checkpoint_slots_busy"
        assert (await long).status == 200 and (await c2).status == 200
        # Slots free again: c3 is served, waiting for a busy one to finish if need be.
        busy = asyncio.create_task(s.complete("c0", max_tokens=20))
        await asyncio.sleep(0.02)
        assert (await s.complete("c3")).status == 200
        assert (await busy).status == 200

    run(check, template, folder, slots=3, load_timeout_s=0.2)


def test_a_refused_load_into_an_evicted_slot_empties_it(library):
    """An evicted checkpoint's slot is loaded without an unload first: when the workers refuse
    the new checkpoint, the slot is emptied as an unload would, and serves the next load."""
    template, folder = library

    async def check(s: Store) -> None:
        for name in ("c0", "c1"):
            assert (await s.complete(name)).status == 200
        s.engine.refused[str(folder.resolve() / "c2")] = "c2: the workers refuse it"
        r = await s.complete("c2")  # evicts c0 (least recently used), then fails
        assert r.status == 400 and r.json()["error"]["message"] == "c2: the workers refuse it"
        assert 1 not in s.engine.slots  # c0's, emptied
        assert (await s.models())["c0"] == ("host", None)
        assert (await s.complete("c3")).status == 200
        assert s.engine.loads[-1] == (1, str(folder.resolve() / "c3"), False)

    run(check, template, folder, slots=3)


def test_requests_for_one_folder_share_one_load(library):
    template, folder = library

    async def check(s: Store) -> None:
        s.engine.load_s = 0.1
        replies = await asyncio.gather(*(s.complete(f"c{i % 2}") for i in range(16)))
        assert [r.status for r in replies] == [200] * 16
        assert sorted(Path(p).name for _, p, _ in s.engine.loads) == ["c0", "c1"]
        # 8 checkpoints' worth of requests over 2 free slots: all served, none lost.
        replies = await asyncio.gather(*(s.complete(f"c{i % 5}") for i in range(40)))
        assert [r.status for r in replies] == [200] * 40
        assert s.store.waiting == 0
        assert all(m.in_flight == 0 and m.pending == 0 for m in s.engine.models.models.values())

    run(check, template, folder, slots=3)


def test_directory_changes_while_serving(library, tmp_path, caplog):
    """A new folder serves at once; a broken or incompatible one is a 400 naming the file and
    field, logged once, the others serving on; a removed one stops being listed and is
    unloaded once idle; names that are paths are never looked up on disk."""
    template, source = library
    folder = Path(shutil.copytree(source, tmp_path / "dir"))
    other_base = make_checkpoint(tmp_path / "other", seed=3)  # another base model

    async def check(s: Store) -> None:
        router_variant(template, folder / "new", seed=9)
        assert (await s.complete("new")).status == 200  # unknown name: rescanned, loaded
        # Each written beside the directory, then moved in whole (as a deployment should).
        alien = Path(
            shutil.copytree(other_base, tmp_path / "alien", ignore=shutil.ignore_patterns("base"))
        )
        config = (other_base / "remix_config.json").read_text()
        (alien / "remix_config.json").write_text(
            config.replace('"base"', f'"{other_base / "base"}"')
        )
        broken = Path(shutil.copytree(source / "c0", tmp_path / "broken"))
        (broken / ADAPTERS_FILE).write_bytes(b"not safetensors")
        alien.rename(folder / "alien")
        broken.rename(folder / "broken")
        with caplog.at_level(logging.WARNING, logger="remix_serve.store"):
            for _ in range(2):
                for name, named in (("alien", "base_model"), ("broken", ADAPTERS_FILE)):
                    r = await s.complete(name)
                    assert r.status == 400, r.body
                    error = r.json()["error"]
                    assert error["code"] == "invalid_checkpoint" and error["param"] == "model"
                    assert str(folder / name) in error["message"] and named in error["message"]
                await asyncio.sleep(0.1)  # rescans meanwhile
        assert sum("alien" in m for m in caplog.messages) == 1
        assert sum("broken" in m for m in caplog.messages) == 1
        assert "alien" not in await s.models() and "broken" not in await s.models()
        assert (await s.complete("c0")).status == 200
        # Removed while a request runs: it finishes; then the slot is freed.
        slow = asyncio.create_task(s.complete("new", max_tokens=30))
        await asyncio.sleep(0.02)
        shutil.rmtree(folder / "new")
        assert "new" not in await s.models()
        assert (await s.complete("new")).status == 404
        assert (await slow).status == 200
        await asyncio.sleep(0.2)  # a rescan interval or two
        assert "new" not in s.engine.models.models
        assert str(folder.resolve() / "new") not in s.engine.slots.values()
        for name in ("../dir/c0", "c0/..", "/etc", ".hidden", "a\\b"):
            assert (await s.complete(name)).status == 404, name

    run(check, template, folder, slots=3)


def test_symlinks_out_of_the_directory_are_refused(library, tmp_path):
    template, source = library
    folder = tmp_path / "dir"
    folder.mkdir()
    os.symlink(source / "c0", folder / "outside")  # a folder elsewhere
    inside = folder / "c1"
    shutil.copytree(source / "c1", inside)
    os.symlink(inside, folder / "alias")  # inside the directory: fine
    (folder / "c2").mkdir()
    os.symlink(source / "c2" / "remix_config.json", folder / "c2" / "remix_config.json")
    os.symlink(source / "c2" / ADAPTERS_FILE, folder / "c2" / ADAPTERS_FILE)

    async def check(s: Store) -> None:
        assert set(await s.models()) == {"pin", "c1", "alias"}
        assert (await s.complete("outside")).status == 404
        assert (await s.complete("alias")).status == 200

    run(check, template, folder)


def test_checkpoint_header_is_checked_without_reading_tensors(checkpoint_dir):
    header = read_checkpoint_header(checkpoint_dir)
    assert header.tensors == {} and header.config == load_checkpoint(checkpoint_dir).config
    config = (checkpoint_dir / "remix_config.json").read_text()
    (checkpoint_dir / "remix_config.json").write_text(config.replace('"rank": 4', '"rank": 8'))
    with pytest.raises(CheckpointError, match="adapters.safetensors: tensor .* has shape"):
        read_checkpoint_header(checkpoint_dir)


def test_names_and_host_default():
    assert valid_folder_name("ckpt-1.v2") and not valid_folder_name("")
    for bad in ("..", ".", "a/b", "a\\b", ".tmp", "a b", "a,b"):
        assert not valid_folder_name(bad), bad
    gib = 1 << 30
    assert default_host_checkpoints(100 << 20, 24 * gib) == 24  # 2.4 GiB over 100 MiB
    assert default_host_checkpoints(1 << 20, 1024 * gib) == 256  # at most 256
    assert default_host_checkpoints(64 * gib, 24 * gib) == 1  # at least one


def test_cli_checkpoint_dir(library, tmp_path, monkeypatch):
    template, folder = library
    engine = build_engine(build_parser().parse_args(["--checkpoint-dir", str(folder)]))
    assert engine.settings.max_checkpoints == 4  # no --checkpoint: 0 + 4
    (first,) = engine.models.models.values()
    assert (first.name, first.slot, first.pinned) == ("c0", 0, False)
    args = ["--checkpoint-dir", str(folder), "--checkpoint", f"t={template}"]
    engine = build_engine(build_parser().parse_args(args))
    assert engine.settings.max_checkpoints == 5 and engine.models.models["t"].pinned
    monkeypatch.setenv("REMIX_CHECKPOINT_DIR", f"{folder},{tmp_path}")
    args = build_parser().parse_args([])
    checkpoints_from_environment(args)
    assert args.checkpoint_dir == [str(folder), str(tmp_path)]
    with pytest.raises(SettingsError, match="no valid checkpoint folder"):
        build_engine(build_parser().parse_args(["--checkpoint-dir", str(tmp_path)]))
    with pytest.raises(SettingsError, match="not a directory"):
        build_engine(build_parser().parse_args(["--checkpoint-dir", str(tmp_path / "x")]))

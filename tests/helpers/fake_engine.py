"""A stand-in for server.engine_client.RemixEngine with no vLLM process: the HTTP layer's unit
tests run against it in milliseconds. It speaks in vLLM's own output types (RequestOutput,
CompletionOutput, Logprob) and honours the SamplingParams the server builds (max_tokens,
output kind, logprobs, prompt logprobs, seed), so what it checks is the server's use of them.

Token i is the byte i: text prompts tokenize to their UTF-8 bytes; generated tokens are lowercase
letters, each `slot + 1` letters after the previous token (the last prompt token first) modulo
26, so every model answers differently: after "ab", slot 0 gives "cdefg", slot 1 "dfhjl", the
base model (slot -1) "bbbbb"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from remix_infer.checkpoint import RemixCheckpoint
from remix_infer.vllm_plugin.engine import BASE_MODEL_SLOT, CHECKPOINT_SLOT_KEY
from server.models import ModelTable

VOCAB = 256


class FakeTokenizer:
    chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"

    def __init__(self, encode_s_per_char: float = 0.0) -> None:
        self.encode_s_per_char = encode_s_per_char

    def encode(self, text: str) -> list[int]:
        # a slow tokenizer: it holds the GIL-free part of its thread, like a real one
        time.sleep(len(text) * self.encode_s_per_char)
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<a>")


class FakeLLM:
    errored = False


class FakeEngine:
    """Serves the byte-level fake model; `step_s` between generated tokens."""

    def __init__(
        self,
        step_s: float = 0.0,
        max_model_len: int = 128,
        models: tuple[str, ...] = ("fake",),
        base_model: str | None = None,
        max_slots: int | None = None,
        template: RemixCheckpoint | None = None,
        **tokenizer: Any,
    ) -> None:
        """Checkpoints `models` in slots 0.., the base model as `base_model`; `template`: the
        checkpoint the slots were sized from (admin loads are checked against it; None: no slots to load)."""
        self.step_s = step_s
        self.path = Path("/fake/model")
        self.base_model_path = self.path
        self.template = template
        self.remix_config = template.config if template is not None else None
        self.models = ModelTable(max_slots or len(models))
        for slot, name in enumerate(models):
            self.models.add(name, slot, Path(f"/fake/{name}"), None)
        if base_model is not None:
            self.models.add(base_model, BASE_MODEL_SLOT, self.path, None)
        self.slots: dict[int, str] = {s: f"/fake/{n}" for s, n in enumerate(models)}  # loaded
        self.salts: list[str] = []  # the cache_salt of every engine request
        self.tokenizer = FakeTokenizer(**tokenizer)
        self.max_model_len = max_model_len
        self.vocab_size = VOCAB
        self.async_llm: FakeLLM | None = None
        self.error: BaseException | None = None
        self.started_at: float | None = None
        self.stat_loggers: list[Any] = []
        self.running: set[str] = set()
        self.slot_of: dict[str, int] = {}  # each running request's slot
        self.generated = 0  # tokens, over all requests
        self.load_s = 0.0  # how long a load takes (0: step_s)
        self.loads: list[tuple[int, str, bool]] = []  # (slot, path, from the host tier)
        self.host: set[str] = set()  # the host tier's keys
        self.refused: dict[str, str] = {}  # path -> why the workers refuse to load it

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.async_llm is not None and self.error is None and not self.async_llm.errored

    @property
    def failed(self) -> bool:
        return self.error is not None

    def describe(self) -> str:
        return "fake engine"

    async def start(self) -> None:
        self.async_llm = FakeLLM()
        self.started_at = time.time()

    async def watch(self, on_failure: Any, interval_s: float = 0.01) -> None:
        while self.error is None:
            if self.async_llm is not None and self.async_llm.errored:
                self.error = RuntimeError("engine died")
                break
            await asyncio.sleep(interval_s)
        on_failure()

    def die(self) -> None:
        """What a dead engine core looks like from the server."""
        assert self.async_llm is not None
        self.async_llm.errored = True

    def shutdown(self) -> None:
        self.async_llm = None

    # -- tokenizer ----------------------------------------------------------------------------

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await asyncio.to_thread(self.tokenizer.encode, text)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return [chr(t) for t in token_ids]

    async def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    @property
    def has_chat_template(self) -> bool:
        return True

    async def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        return self.tokenizer.apply_chat_template(messages)

    # -- generation ---------------------------------------------------------------------------

    def _logprobs(self, token_id: int, count: int) -> dict[int, Any]:
        from vllm.logprobs import Logprob

        entry = {token_id: Logprob(logprob=-0.25, rank=1, decoded_token=chr(token_id))}
        for k in range(count):
            other = 48 + k  # digits: never generated
            entry[other] = Logprob(logprob=-2.0 - k, rank=k + 2, decoded_token=chr(other))
        return entry

    async def generate(
        self, prompt_token_ids: list[int], params: Any, request_id: str, cache_salt: str
    ) -> Any:
        from vllm.outputs import CompletionOutput, RequestOutput
        from vllm.sampling_params import RequestOutputKind

        if self.async_llm is None or self.async_llm.errored:
            raise RuntimeError("engine dead")
        slot = params.extra_args[CHECKPOINT_SLOT_KEY]
        if slot != BASE_MODEL_SLOT and slot not in self.slots:
            raise RuntimeError(f"slot {slot} is empty")  # the server's bug, not the client's
        self.salts.append(cache_salt)
        delta = params.output_kind == RequestOutputKind.DELTA
        prompt_lp = None
        if params.prompt_logprobs is not None:
            prompt_lp = [None] + [
                self._logprobs(t, params.prompt_logprobs) for t in prompt_token_ids[1:]
            ]
        self.running.add(request_id)
        self.slot_of[request_id] = slot
        tokens: list[int] = []
        logprobs: list[Any] = []
        token = prompt_token_ids[-1] + (params.seed or 0)
        try:
            for step in range(params.max_tokens):
                if self.step_s:
                    await asyncio.sleep(self.step_s)
                if self.async_llm is None or self.async_llm.errored:
                    raise RuntimeError("engine dead")
                token = 97 + (token - 97 + slot + 1) % 26
                tokens.append(token)
                self.generated += 1
                if params.logprobs is not None:
                    logprobs.append(self._logprobs(token, params.logprobs))
                last = step == params.max_tokens - 1
                if not (delta or last):
                    continue
                new = tokens[-1:] if delta else tokens
                out = CompletionOutput(
                    index=0,
                    text=self.tokenizer.decode(new),
                    token_ids=list(new),
                    cumulative_logprob=None,
                    logprobs=(logprobs[-1:] if delta else logprobs)
                    if params.logprobs is not None
                    else None,
                    finish_reason="length" if last else None,
                )
                yield RequestOutput(
                    request_id=request_id,
                    prompt=None,
                    prompt_token_ids=prompt_token_ids,
                    prompt_logprobs=prompt_lp if (step == 0 or not delta) else None,
                    outputs=[out],
                    finished=last,
                )
        finally:
            self.running.discard(request_id)
            self.slot_of.pop(request_id, None)

    async def take_request_routing(self, key: str) -> dict[str, Any] | None:
        return None

    async def routing_stats(self) -> list:
        return []

    def _check_idle(self, slot: int) -> None:
        """No request for `slot` runs, or is counted in flight for its model, while it changes."""
        taken = [m for m in self.models.models.values() if m.slot == slot and m.in_flight]
        assert not taken and slot not in self.slot_of.values(), f"slot {slot} is in use"

    async def load_slot(
        self, slot: int, path: Path, host_key: str | None = None, drop: Sequence[str] = ()
    ) -> None:
        """Load into `slot`, replacing what it holds (an evicted checkpoint, not unloaded)."""
        self._check_idle(slot)
        self.host.difference_update(drop)
        if str(path) in self.refused:
            raise ValueError(self.refused[str(path)])
        self.loads.append((slot, str(path), host_key in self.host))
        await asyncio.sleep(self.load_s or self.step_s)  # a load's worth (default: a step's)
        self.slots[slot] = str(path)
        if host_key is not None:
            self.host.add(host_key)

    async def unload_slot(self, slot: int) -> None:
        self._check_idle(slot)
        del self.slots[slot]

    def num_unfinished_requests(self) -> int:
        return len(self.running)

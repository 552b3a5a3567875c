"""The serving pipeline shared by /v1/completions and /v1/chat/completions: model check,
readiness, limits, admission, max_tokens, fan-out of n choices, run to the end or stream (with
cancellation when the client goes away), and the routing summary. A request's `model` picks
its checkpoint (server/models.py). Subclasses
(serving_completion.py, serving_chat.py) turn a request into prompts and engine outputs into
their response bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from remix_infer.config import ALL_TARGET_MODULES, split_module_path
from server.admission import CLIENT_CLOSED, Admission, Ticket
from server.engine_client import RemixEngine
from server.errors import APIError
from server.models import ServedModel
from server.protocol import (
    RemixInfo,
    RoutingSummary,
    SamplingFields,
    Usage,
    new_id,
    now,
    response_json,
)
from server.settings import ServerSettings
from server.store import CheckpointStore, Folder

log = logging.getLogger("remix_serve.serving")

RequestT = TypeVar("RequestT", bound=SamplingFields)


@dataclass
class Job(Generic[RequestT]):
    """One HTTP request on its way through the engine: engine request i is (prompt, params)
    `calls[i]`, choice index i (prompt i // n)."""

    req: RequestT
    id: str
    model: ServedModel
    prompts: list[list[int]]
    calls: list[tuple[list[int], Any]]
    created: int = field(default_factory=now)
    texts_sent: dict[int, int] = field(default_factory=dict)  # choice -> characters streamed
    extra: Any = None  # what the endpoint prepared (completions: the echoed prompt texts)

    def header(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model.name}


def fan_out(prompts: list[list[int]], params: Any, n: int) -> list[tuple[list[int], Any]]:
    """One engine request per (prompt, choice). Choice c of a seeded request samples with
    seed + c, as vLLM's own parallel sampling does; at temperature 0 the n choices are the same
    greedy answer, as OpenAI returns them."""
    calls = []
    for prompt in prompts:
        for c in range(n):
            copy = params
            if c and params.seed is not None:
                copy = params.clone()
                copy.seed = params.seed + c
            calls.append((prompt, copy))
    return calls


def sse(payload: BaseModel) -> str:
    return f"data: {json.dumps(response_json(payload), ensure_ascii=False)}\n\n"


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, Any]) -> Any:
    """The result of `work`, cancelled (and a 499) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
    if task.cancelled():
        log.info("client went away: request aborted")
        raise APIError(CLIENT_CLOSED, "client disconnected", code="client_disconnected")
    return task.result()


def check_constraint(req: SamplingFields) -> None:
    """A 400 naming the field for a schema, regex, grammar or choice list that xgrammar (the
    backend vLLM picks for every constraint that passes this) cannot compile: checked here,
    before the engine sees the request and before a stream starts."""
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

    constraint = req.constraint()
    if constraint is None:
        return
    name, params = constraint
    try:  # it reads only .structured_outputs (and turns a choice list into a grammar)
        validate_xgrammar_grammar(SimpleNamespace(structured_outputs=params))  # type: ignore[arg-type]
    except Exception as e:
        raise APIError(400, f"{name}: {e}", param=name, code="invalid_value") from None


class ServingBase(Generic[RequestT]):
    endpoint: str
    id_prefix: str
    chunk_class: type[BaseModel]

    def __init__(
        self,
        engine: RemixEngine,
        settings: ServerSettings,
        admission: Admission,
        store: CheckpointStore,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.admission = admission
        self.store = store

    # -- what each endpoint provides ---------------------------------------------------------

    async def prompt_token_ids(self, req: RequestT) -> list[list[int]]:
        raise NotImplementedError

    async def prepare(self, job: Job[RequestT]) -> None:
        """Anything the formatters need before the first output (optional)."""

    def stream_chunk(self, job: Job[RequestT], j: int, out: Any) -> BaseModel:
        raise NotImplementedError

    def response_body(
        self, job: Job[RequestT], finals: list[Any], usage: Usage, remix: RemixInfo | None
    ) -> BaseModel:
        raise NotImplementedError

    # -- the shared pipeline -----------------------------------------------------------------

    async def handle(self, request: Request, req: RequestT) -> Response:
        # What needs no admission is refused before it. A loaded model is taken as it resolved
        # (nothing awaits in between, so no unload or eviction starts); a folder is loaded
        # first, the request admitted meanwhile.
        record = self.admission.record(request, self.endpoint)
        found = await self.store.resolve(req.model)
        record.model = found.name  # the metrics' `model` label: a name this server serves
        self.require_ready()
        self.check_limits(req, found)
        ticket = self.admission.admit(request, self.endpoint)
        try:
            model = await self.store.checkout(found)
            ticket.hold(lambda: self.store.release(model))
            job = await self.make_job(req, model, ticket)
            if req.stream:
                return ticket.stream(self.stream_events(job, ticket))
            finals = await cancel_on_disconnect(request, self.collect_finals(job))
            remix = await self.routing_summary(job) if req.return_routing else None
            completion_tokens = sum(len(out.outputs[0].token_ids) for out in finals)
            usage = Usage.of(ticket.record.prompt_tokens, completion_tokens)
            body = self.response_body(job, finals, usage, remix)
            ticket.finish(200, completion_tokens)
            return JSONResponse(response_json(body))
        except BaseException as e:
            ticket.fail(e)  # a no-op once the stream owns the ticket
            raise

    async def make_job(self, req: RequestT, model: ServedModel, ticket: Ticket) -> Job[RequestT]:
        prompts = await self.prompt_token_ids(req)
        max_tokens = self.max_tokens(req, prompts)
        self.check_token_ids(req)
        rid = new_id(self.id_prefix)
        from vllm.exceptions import VLLMClientError

        try:
            params = req.to_sampling_params(max_tokens, routing_key=rid, slot=model.slot)
        except (ValueError, TypeError, VLLMClientError) as e:  # vLLM's own checks
            param = getattr(e, "parameter", None)
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        check_constraint(req)
        ticket.record.prompt_tokens = sum(len(p) for p in prompts)
        job = Job(
            req=req, id=rid, model=model, prompts=prompts, calls=fan_out(prompts, params, req.n)
        )
        await self.prepare(job)
        return job

    def require_ready(self) -> None:
        if not self.engine.ready:
            raise APIError(
                503,
                "The engine failed" if self.engine.failed else "The engine is not ready yet",
                type="server_error",
                code="engine_not_ready",
                headers={"Retry-After": "5"},
            )

    def check_limits(self, req: SamplingFields, model: ServedModel | Folder) -> None:
        """What this server can do for a well-formed request: n, and routing only with adapters."""
        if req.n > self.settings.max_n:
            raise APIError(
                400,
                f"n is too large: {req.n} (at most {self.settings.max_n})",
                param="n",
                code="invalid_value",
            )
        if req.return_routing and model.config is None:
            raise APIError(
                400,
                f"remix.return_routing: the model '{model.name}' is a base model without ReMix "
                "adapters (it has no routing to return)",
                param="remix.return_routing",
                code="invalid_value",
            )

    def check_token_ids(self, req: SamplingFields) -> None:
        vocab = self.engine.vocab_size
        for name, ids in req.token_ids().items():
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise APIError(
                    400,
                    f"{name}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                    param=name,
                    code="invalid_value",
                )

    def max_tokens(self, req: SamplingFields, prompts: list[list[int]]) -> int:
        limit = self.engine.max_model_len
        longest = max(len(p) for p in prompts)
        if longest >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{longest} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        room = limit - longest
        requested = req.requested_max_tokens()
        if requested is None:
            return req.default_max_tokens(room)
        if requested > room:
            raise APIError(
                400,
                f"max_tokens is too large: {requested}. This model's maximum context length is "
                f"{limit} tokens and the prompt has {longest} tokens, so at most {room} can be "
                "generated",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    async def outputs(self, job: Job[RequestT]) -> AsyncIterator[tuple[int, Any]]:
        """(engine request index, RequestOutput) as the engine produces them; closing this
        aborts the engine requests (AsyncLLM.generate aborts on cancel/close)."""
        from vllm.utils.async_utils import merge_async_iterators

        salt = job.model.cache_salt
        gens = [
            self.engine.generate(p, ps, f"{job.id}-{i}", salt)
            for i, (p, ps) in enumerate(job.calls)
        ]
        async for i, out in merge_async_iterators(*gens):
            yield i, out

    async def collect_finals(self, job: Job[RequestT]) -> list[Any]:
        finals: list[Any] = [None] * len(job.calls)
        try:
            async for i, out in self.outputs(job):
                finals[i] = out
        except APIError:
            raise
        except Exception as e:
            raise self.engine_error(e) from None
        return finals

    async def stream_events(self, job: Job[RequestT], ticket: Ticket) -> AsyncIterator[str]:
        status, completion_tokens = 200, 0
        try:
            async for j, out in self.outputs(job):
                completion_tokens += sum(len(o.token_ids) for o in out.outputs)
                yield sse(self.stream_chunk(job, j, out))
            usage = Usage.of(ticket.record.prompt_tokens, completion_tokens)
            remix = await self.routing_summary(job) if job.req.return_routing else None
            if job.req.include_usage or remix is not None:
                yield sse(
                    self.chunk_class(
                        **job.header(),
                        choices=[],
                        usage=usage if job.req.include_usage else None,
                        remix=remix,
                    )
                )
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            status = CLIENT_CLOSED
            raise
        except Exception as e:  # sent as an error event, then [DONE]
            err = e if isinstance(e, APIError) else self.engine_error(e)
            status = err.status
            yield err.sse_event()
        finally:
            ticket.finish(status, completion_tokens)
        yield "data: [DONE]\n\n"

    def engine_error(self, e: Exception) -> APIError:
        from vllm.exceptions import VLLMClientError

        if isinstance(e, VLLMClientError | ValueError):
            return APIError(400, str(e), code="invalid_value")
        if self.engine.failed or getattr(self.engine.async_llm, "errored", False):
            return APIError(503, "The engine failed", "server_error", code="engine_failed")
        log.error("engine error: %r", e)
        return APIError(500, "The engine failed to process the request", "server_error")

    async def routing_summary(self, job: Job[RequestT]) -> RemixInfo | None:
        """The engine's selections for this request's tokens (indices into its own checkpoint's
        pools), as the response's `remix`."""
        raw = await self.engine.take_request_routing(job.id)
        config = job.model.config
        if raw is None or config is None:
            return None
        by_module = {split_module_path(path): counts for path, counts in raw["modules"].items()}
        layers = [  # modules in model order: q, k, v, o, gate, up, down
            {m: by_module[(i, m)] for m in ALL_TARGET_MODULES if (i, m) in by_module}
            for i in range(config.num_layers)
        ]
        return RemixInfo(
            routing=RoutingSummary(
                tokens=raw["tokens"], num_loras=config.num_loras, top_k=config.top_k, layers=layers
            )
        )

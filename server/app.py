"""The FastAPI app: OpenAI-compatible completions and chat completions over a RemixEngine.

Hooks for other parts of the service (metrics):
- `app.state.engine`: the RemixEngine (`await engine.routing_stats()`, `engine.engine` is the
  AsyncLLM once ready);
- `app.state.observers`: callables receiving one `RequestRecord` per finished /v1 request
  (endpoint, HTTP status, token counts, latencies), success or error;
- `app.state.inflight`: requests currently admitted (bounded by `ServerSettings.max_queue`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from remix_infer.config import ALL_TARGET_MODULES, RemixConfig, split_module_path
from remix_infer.vllm_plugin.worker import ROUTING_KEY
from server.engine import RemixEngine
from server.metrics import RequestRecord, RoutingCollector, ServingMetrics, stat_logger_factory
from server.protocol import (
    APIError,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChunk,
    ChatDelta,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChunk,
    ModelCard,
    ModelList,
    RemixInfo,
    RoutingSummary,
    SamplingFields,
    Usage,
    new_id,
    now,
    response_json,
    unsupported_field,
)

log = logging.getLogger("remix_serve.app")


@dataclass
class ServerSettings:
    served_model_name: str = "remix-demo"
    api_key: str | None = None
    max_queue: int = 256  # requests admitted at once (running + waiting); past it: 429
    max_n: int = 16
    retry_after_s: int = 1


# ---------------------------------------------------------------------------------------------
# Errors


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_error(e: ValidationError | RequestValidationError) -> APIError:
    errors = e.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # Union members add their type to the location (prompt.str, prompt.list[int]...): drop them.
    loc = [x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int")]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    elif kind == "json_invalid":
        return APIError(400, "Invalid JSON body", code="invalid_json")
    else:
        msg = f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}"
    return APIError(400, msg, param=param, code="invalid_value")


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "Invalid JSON body", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object", code="invalid_json")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    name = unsupported_field(req)
    if name is not None:
        raise APIError(400, f"'{name}' is not supported by this server", param=name)
    return req


# ---------------------------------------------------------------------------------------------
# Building engine requests


def _check_model(req: SamplingFields, settings: ServerSettings) -> str:
    if req.model is not None and req.model != settings.served_model_name:
        raise APIError(
            404,
            f"The model '{req.model}' does not exist (this server serves "
            f"'{settings.served_model_name}')",
            param="model",
            code="model_not_found",
        )
    return settings.served_model_name


def _tokenize_prompts(req: CompletionRequest, engine: RemixEngine) -> list[list[int]]:
    prompts = req.prompts()
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
    out: list[list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            if p == "":
                raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
            ids = list(engine.tokenizer.encode(p))
        else:
            ids = list(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
            bad = [t for t in ids if t < 0 or t >= engine.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"prompt: token id {bad[0]} is outside the vocabulary (0..{engine.vocab_size - 1})",
                    param="prompt",
                    code="invalid_value",
                )
        out.append(ids)
    return out


def _max_tokens(
    req: SamplingFields, requested: int | None, prompts: list[list[int]], limit: int
) -> int:
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
    if requested is None:
        return min(16, room) if isinstance(req, CompletionRequest) else room
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


def _sampling_params(
    req: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    stream: bool,
    routing_key: str,
) -> Any:
    """The SamplingParams of one choice (the server fans out n choices itself: see
    _engine_requests)."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind

    try:
        return SamplingParams(
            n=1,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            seed=req.seed,
            stop=req.stop_list(),
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            max_tokens=max_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            extra_args={ROUTING_KEY: routing_key} if req.return_routing else None,
        )
    except (ValueError, TypeError, VLLMClientError) as e:
        raise APIError(400, str(e), code="invalid_value") from None


def _engine_requests(prompts: list[list[int]], params: Any, n: int) -> list[tuple[list[int], Any]]:
    """One engine request per (prompt, choice), choice index = position in the list. Choice c of
    a seeded request samples with seed + c, as vLLM's own parallel sampling does; at temperature
    0 the n choices are the same greedy answer, as OpenAI returns them."""
    calls = []
    for prompt in prompts:
        for c in range(n):
            copy = params
            if c and params.seed is not None:
                copy = params.clone()
                copy.seed = params.seed + c
            calls.append((prompt, copy))
    return calls


def _routing_summary(raw: dict[str, Any] | None, config: RemixConfig) -> RemixInfo | None:
    """The engine's per-request selections, as the response's `remix.routing`."""
    if raw is None:
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


def _decode_token(engine: RemixEngine, token_id: int, lp: Any) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return engine.tokenizer.decode([token_id])


def _completion_logprobs(
    engine: RemixEngine,
    token_ids: list[int],
    logprobs: list[Any] | None,
    offset: int,
) -> CompletionLogprobs:
    """OpenAI completion logprobs for `token_ids`; `logprobs[i]` is vLLM's {id: Logprob} for
    token i (None for a prompt's first token). Offsets start at `offset`."""
    out = CompletionLogprobs()
    for i, tid in enumerate(token_ids):
        entry = logprobs[i] if logprobs is not None and i < len(logprobs) else None
        chosen = entry.get(tid) if entry else None
        text = _decode_token(engine, tid, chosen)
        out.tokens.append(text)
        out.token_logprobs.append(chosen.logprob if chosen is not None else None)
        out.top_logprobs.append(
            {_decode_token(engine, t, lp): lp.logprob for t, lp in entry.items()} if entry else None
        )
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _merge_logprobs(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=a.tokens + b.tokens,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=a.top_logprobs + b.top_logprobs,
        text_offset=a.text_offset + b.text_offset,
    )


def _finish(o: Any) -> str | None:
    return o.finish_reason if o.finish_reason is not None else None


# ---------------------------------------------------------------------------------------------
# The app


class APIKeyMiddleware:
    """401 for /v1 requests without `Authorization: Bearer <key>`. Plain ASGI: Starlette's
    BaseHTTPMiddleware (@app.middleware) re-wraps every streamed chunk, which was half of this
    process's CPU time under streaming load."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.expected):
                response = _error_response(
                    APIError(
                        401,
                        "Incorrect or missing API key (send 'Authorization: Bearer <key>')",
                        code="invalid_api_key",
                    )
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


FinalChunk = Callable[[Usage, RemixInfo | None], BaseModel | None]


def final_chunk_maker(req: SamplingFields, chunk_cls: type, **header: Any) -> FinalChunk:
    """The stream's last chunk (no choices): usage when the client asked for it with
    stream_options.include_usage, the routing summary when it asked with remix.return_routing;
    None when it asked for neither."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def make(usage: Usage, remix: RemixInfo | None) -> BaseModel | None:
        if not include_usage and remix is None:
            return None
        return chunk_cls(**header, choices=[], usage=usage if include_usage else None, remix=remix)

    return make


def create_app(
    engine: RemixEngine,
    settings: ServerSettings | None = None,
    exit_on_engine_failure: bool = False,
) -> FastAPI:
    """The HTTP service over `engine`; the engine is started by the app's lifespan (in the
    background: /health answers and /ready says 503 while it loads). With
    exit_on_engine_failure the process stops (SIGTERM to itself) when the engine cannot start."""
    settings = settings or ServerSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def start() -> None:
            try:
                await engine.start()
                log.info("ready: serving '%s' (%s)", settings.served_model_name, engine.describe())
            except Exception:
                log.exception("engine failed to start")
                if exit_on_engine_failure:
                    signal.raise_signal(signal.SIGTERM)

        task = asyncio.create_task(start()) if engine.engine is None else None
        app.state.start_task = task
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
            engine.shutdown()

    app = FastAPI(title="remix-serve", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.observers: list[Callable[[RequestRecord], None]] = []
    app.state.inflight = 0

    # Metrics: HTTP observations, the engine scheduler's gauges, routing diversity at scrape time.
    registry = CollectorRegistry()
    serving_metrics = ServingMetrics(registry)
    routing_metrics = RoutingCollector(engine.remix_config) if engine.remix_config else None
    if routing_metrics is not None:
        registry.register(routing_metrics)
    app.state.observers.append(serving_metrics.observe)
    engine.stat_loggers.append(stat_logger_factory(serving_metrics))

    def observe(record: RequestRecord) -> None:
        record.e2e_s = time.perf_counter() - record.started
        for fn in app.state.observers:
            try:
                fn(record)
            except Exception:
                log.exception("observer failed")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _req_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error_response(
            APIError(500, "The server had an error while processing your request", "server_error")
        )

    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)

    @app.get("/metrics")
    async def metrics() -> Response:
        if engine.ready and routing_metrics is not None:
            routing_metrics.update(await engine.routing_stats())
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if engine.ready:
            return JSONResponse(
                {
                    "status": "ready",
                    "model": settings.served_model_name,
                    "requests_in_flight": app.state.inflight,
                    "engine_unfinished_requests": engine.num_unfinished_requests(),
                }
            )
        status = "failed" if engine.error is not None else "starting"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/v1/models")
    async def models() -> ModelList:
        created = int(engine.started_at or time.time())
        return ModelList(
            data=[
                ModelCard(
                    id=settings.served_model_name,
                    created=created,
                    root=str(engine.path),
                    max_model_len=engine.max_model_len or None,
                )
            ]
        )

    def require_ready() -> None:
        if not engine.ready:
            raise APIError(
                503,
                "The engine is not ready yet" if engine.error is None else "The engine failed",
                type="server_error",
                code="engine_not_ready",
                headers={"Retry-After": "5"},
            )

    @contextlib.contextmanager
    def admitted() -> Any:
        if app.state.inflight >= settings.max_queue:
            raise APIError(
                429,
                f"The server is at capacity ({settings.max_queue} requests in flight); retry later",
                type="rate_limit_error",
                code="too_many_requests",
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        app.state.inflight += 1
        try:
            yield
        finally:
            app.state.inflight -= 1

    def check_limits(req: SamplingFields) -> None:
        """What this server can do for a well-formed request: n, and routing only with adapters."""
        if req.n > settings.max_n:
            raise APIError(
                400,
                f"n is too large: {req.n} (at most {settings.max_n})",
                param="n",
                code="invalid_value",
            )
        if req.return_routing and engine.remix_config is None:
            raise APIError(
                400,
                "remix.return_routing: this server serves a base model without ReMix adapters",
                param="remix.return_routing",
                code="invalid_value",
            )

    async def collect_final_outputs(
        request: Request, calls: list[tuple[list[int], Any]], rid: str
    ) -> list[Any]:
        """Final RequestOutput per engine request; aborts them if the client goes away."""
        from vllm.utils.async_utils import merge_async_iterators

        async def collect() -> list[Any]:
            finals: list[Any] = [None] * len(calls)
            gens = [engine.generate(p, ps, f"{rid}-{i}") for i, (p, ps) in enumerate(calls)]
            async for i, out in merge_async_iterators(*gens):
                finals[i] = out
            return finals

        task = asyncio.ensure_future(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    log.info("client went away: aborting %s", rid)
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    raise APIError(499, "client disconnected", code="client_disconnected")
        except BaseException:
            if not task.done():
                task.cancel()
            raise

    async def run_to_end(
        request: Request, calls: list[tuple[list[int], Any]], rid: str, return_routing: bool
    ) -> tuple[list[Any], RemixInfo | None]:
        """A non-streamed request: admitted against the queue bound, engine failures mapped to
        OpenAI errors. Returns the final outputs and, when asked, the routing summary."""
        with admitted():
            try:
                finals = await collect_final_outputs(request, calls, rid)
                return finals, await take_routing(rid) if return_routing else None
            except APIError:
                raise
            except Exception as e:
                raise engine_error(e) from None

    async def take_routing(rid: str) -> RemixInfo | None:
        raw = await engine.take_request_routing(rid)
        return _routing_summary(raw, engine.remix_config)

    def engine_error(e: Exception) -> APIError:
        from vllm.exceptions import VLLMClientError

        if isinstance(e, VLLMClientError | ValueError):
            return APIError(400, str(e), code="invalid_value")
        log.error("engine error: %r", e)
        return APIError(500, "The engine failed to process the request", "server_error")

    def sse(payload: BaseModel | dict) -> str:
        data = payload if isinstance(payload, dict) else response_json(payload)
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def stream_events(
        calls: list[tuple[list[int], Any]],
        rid: str,
        make_chunks: Callable[[int, Any], list[BaseModel]],
        final_chunk: FinalChunk,
        return_routing: bool,
        record: RequestRecord,
    ) -> AsyncIterator[str]:
        from vllm.utils.async_utils import merge_async_iterators

        completion_tokens = 0
        try:
            gens = [engine.generate(p, ps, f"{rid}-{i}") for i, (p, ps) in enumerate(calls)]
            async for i, out in merge_async_iterators(*gens):
                completion_tokens += sum(len(o.token_ids) for o in out.outputs)
                for chunk in make_chunks(i, out):
                    yield sse(chunk)
            usage = Usage.of(record.prompt_tokens, completion_tokens)
            last = final_chunk(usage, await take_routing(rid) if return_routing else None)
            if last is not None:
                yield sse(last)
        except Exception as e:  # sent as an error event, then [DONE]
            err = e if isinstance(e, APIError) else engine_error(e)
            record.status = err.status
            yield sse(err.body())
        finally:
            record.completion_tokens = completion_tokens
            app.state.inflight -= 1
            observe(record)
        yield "data: [DONE]\n\n"

    # -----------------------------------------------------------------------------------------

    async def recorded(
        endpoint: str, handler: Callable, request: Request
    ) -> JSONResponse | StreamingResponse:
        """Run an endpoint's handler with its RequestRecord; a refused request is observed here
        (handlers observe the requests they serve)."""
        record = RequestRecord(endpoint=endpoint, status=200)
        try:
            return await handler(request, record)
        except APIError as e:
            record.status = e.status
            observe(record)
            raise

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        return await recorded("/v1/completions", _completions, request)

    async def _completions(
        request: Request, record: RequestRecord
    ) -> JSONResponse | StreamingResponse:
        req: CompletionRequest = await _parse(request, CompletionRequest)
        model = _check_model(req, settings)
        require_ready()
        check_limits(req)
        prompts = _tokenize_prompts(req, engine)
        max_tokens = _max_tokens(req, req.max_tokens, prompts, engine.max_model_len)
        want_prompt_lp = req.echo and req.logprobs is not None
        rid = new_id("cmpl")
        params = _sampling_params(
            req, max_tokens, req.logprobs, req.logprobs if want_prompt_lp else None, req.stream, rid
        )
        calls = _engine_requests(prompts, params, req.n)  # choice j answers prompt j // n
        created = now()
        record.prompt_tokens = sum(len(p) for p in prompts)
        prompt_texts = [engine.tokenizer.decode(p) for p in prompts] if req.echo else None

        def choice(j: int, out: Any, offset: int, first: bool) -> CompletionChoice:
            """Choice j from its engine output (the whole answer, or a streamed delta whose
            text starts at `offset`; the echoed prompt goes before the first one)."""
            (o,) = out.outputs
            i = j // req.n
            echo = prompt_texts is not None and first
            text = prompt_texts[i] + o.text if echo else o.text
            lp = None
            if req.logprobs is not None:
                start = offset + (len(prompt_texts[i]) if echo else 0)
                lp = _completion_logprobs(engine, list(o.token_ids), o.logprobs, start)
                if echo:
                    plp = _completion_logprobs(engine, prompts[i], out.prompt_logprobs, offset)
                    lp = _merge_logprobs(plp, lp)
            return CompletionChoice(text=text, index=j, logprobs=lp, finish_reason=_finish(o))

        if req.stream:
            offsets: dict[int, int] = {}

            def make_chunks(j: int, out: Any) -> list[BaseModel]:
                c = choice(j, out, offsets.get(j, 0), j not in offsets)
                offsets[j] = offsets.get(j, 0) + len(c.text)
                return [CompletionStreamChunk(id=rid, created=created, model=model, choices=[c])]

            final_chunk = final_chunk_maker(
                req, CompletionStreamChunk, id=rid, created=created, model=model
            )
            return start_stream(calls, rid, make_chunks, final_chunk, req.return_routing, record)

        finals, remix = await run_to_end(request, calls, rid, req.return_routing)
        choices = [choice(j, out, 0, True) for j, out in enumerate(finals)]
        record.completion_tokens = sum(len(out.outputs[0].token_ids) for out in finals)
        observe(record)
        body = CompletionResponse(
            id=rid,
            created=created,
            model=model,
            choices=choices,
            usage=Usage.of(record.prompt_tokens, record.completion_tokens),
            remix=remix,
        )
        return JSONResponse(response_json(body))

    def start_stream(
        calls: list[tuple[list[int], Any]],
        rid: str,
        make_chunks: Callable[[int, Any], list[BaseModel]],
        final_chunk: FinalChunk,
        return_routing: bool,
        record: RequestRecord,
    ) -> StreamingResponse:
        # Admission: the slot is released by stream_events when the stream ends (or the
        # client goes away: Starlette cancels the generator, which aborts the engine request).
        if app.state.inflight >= settings.max_queue:
            with admitted():
                pass  # raises the 429
        app.state.inflight += 1
        return StreamingResponse(
            stream_events(calls, rid, make_chunks, final_chunk, return_routing, record),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -----------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        return await recorded("/v1/chat/completions", _chat, request)

    def chat_logprobs(o: Any) -> dict[str, Any] | None:
        if o.logprobs is None:
            return None
        content = []
        for tid, entry in zip(o.token_ids, o.logprobs, strict=False):
            chosen = entry.get(tid)
            tok = _decode_token(engine, tid, chosen)
            content.append(
                {
                    "token": tok,
                    "logprob": chosen.logprob if chosen is not None else None,
                    "bytes": list(tok.encode()),
                    "top_logprobs": [
                        {
                            "token": (t := _decode_token(engine, k, lp)),
                            "logprob": lp.logprob,
                            "bytes": list(t.encode()),
                        }
                        for k, lp in entry.items()
                    ],
                }
            )
        return {"content": content}

    async def _chat(request: Request, record: RequestRecord) -> JSONResponse | StreamingResponse:
        req: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        model = _check_model(req, settings)
        require_ready()
        check_limits(req)
        tok = engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(
                400,
                "This model has no chat template; use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        try:
            ids = tok.apply_chat_template(
                [m.model_dump(exclude_none=True) for m in req.messages],
                tokenize=True,
                add_generation_prompt=True,
            )
        except Exception as e:
            raise APIError(400, f"messages: chat template failed: {e}", param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        prompts = [list(ids)]
        if not prompts[0]:
            raise APIError(400, "messages render to an empty prompt", param="messages")
        requested = req.max_completion_tokens or req.max_tokens
        max_tokens = _max_tokens(req, requested, prompts, engine.max_model_len)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        rid = new_id("chatcmpl")
        params = _sampling_params(req, max_tokens, logprobs, None, req.stream, rid)
        calls = _engine_requests(prompts, params, req.n)  # choice j = calls[j]
        created = now()
        record.prompt_tokens = len(prompts[0])

        if req.stream:
            started: set[int] = set()

            def make_chunks(j: int, out: Any) -> list[BaseModel]:
                (o,) = out.outputs
                first = j not in started
                started.add(j)
                delta = ChatDelta(role="assistant" if first else None, content=o.text)
                return [
                    ChatCompletionStreamChunk(
                        id=rid,
                        created=created,
                        model=model,
                        choices=[
                            ChatStreamChoice(
                                index=j,
                                delta=delta,
                                logprobs=chat_logprobs(o),
                                finish_reason=_finish(o),
                            )
                        ],
                    )
                ]

            final_chunk = final_chunk_maker(
                req, ChatCompletionStreamChunk, id=rid, created=created, model=model
            )
            return start_stream(calls, rid, make_chunks, final_chunk, req.return_routing, record)

        finals, remix = await run_to_end(request, calls, rid, req.return_routing)
        outputs = [out.outputs[0] for out in finals]
        record.completion_tokens = sum(len(o.token_ids) for o in outputs)
        observe(record)
        body = ChatCompletionResponse(
            id=rid,
            created=created,
            model=model,
            choices=[
                ChatChoice(
                    index=j,
                    message=ChatResponseMessage(content=o.text),
                    logprobs=chat_logprobs(o),
                    finish_reason=_finish(o),
                )
                for j, o in enumerate(outputs)
            ],
            usage=Usage.of(record.prompt_tokens, record.completion_tokens),
            remix=remix,
        )
        return JSONResponse(response_json(body))

    return app

"""The HTTP routes: thin functions over the serving objects in `Services`. The /v1 POST routes
declare their request models, so /openapi.json documents every field of their bodies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.admin import CheckpointAdmin
from server.admission import Admission
from server.engine_client import RemixEngine
from server.errors import ErrorResponse
from server.metrics import Metrics
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CheckpointInfo,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadCheckpointRequest,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    UnloadCheckpointRequest,
)
from server.serving_chat import ServingChat
from server.serving_completion import ServingCompletion
from server.serving_tokenize import ServingTokenize
from server.settings import ServerSettings
from server.store import CheckpointStore


@dataclass
class Services:
    """What the routes serve from (one per app: `app.state.services`)."""

    engine: RemixEngine
    settings: ServerSettings
    admission: Admission
    metrics: Metrics
    store: CheckpointStore
    completion: ServingCompletion
    chat: ServingChat
    tokenize: ServingTokenize
    admin: CheckpointAdmin


def services(request: Request) -> Services:
    return request.app.state.services


def _documented(ok: type) -> dict[int | str, dict[str, Any]]:
    error = {"model": ErrorResponse}
    return {
        200: {
            "model": ok,
            "description": "The answer; with `stream: true`, server-sent events of its chunks",
        },
        **{status: error for status in (400, 401, 404, 413, 429, 503)},
    }


def _admin_documented() -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 503)}


router = APIRouter()


@router.post("/v1/completions", response_model=None, responses=_documented(CompletionResponse))
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return await services(request).completion.handle(request, body)


@router.post(
    "/v1/chat/completions", response_model=None, responses=_documented(ChatCompletionResponse)
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    return await services(request).chat.handle(request, body)


def _tokenize_documented() -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}


@router.post("/tokenize", responses=_tokenize_documented())
async def tokenize(
    body: TokenizeCompletionRequest | TokenizeChatRequest, request: Request
) -> TokenizeResponse:
    """vLLM's /tokenize: `prompt` (with `add_special_tokens`) or `messages` (through the chat
    template, with `add_generation_prompt`) to token ids."""
    return await services(request).tokenize.tokenize(body)


@router.post("/detokenize", responses=_tokenize_documented())
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """vLLM's /detokenize: token ids to text."""
    return await services(request).tokenize.detokenize(body)


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    """Every servable model, with where it is: `loaded` (in `slot`), `host` (its tensors in
    host memory) or `available` (a folder read on first use)."""
    s = services(request)
    await s.store.rescan()
    base_dir = getattr(s.engine, "base_model_path", None)
    cards = [
        ModelCard(
            id=m.name,
            created=getattr(m, "created", int(s.engine.started_at or 0)),
            root=str(m.path),
            parent=str(base_dir)
            if base_dir is not None and not getattr(m, "is_base", False)
            else None,
            max_model_len=s.engine.max_model_len or None,
            status=status,
            slot=slot,
        )
        for m, status, slot in s.store.listed()
    ]
    return ModelList(data=cards)


@router.post("/v1/load_checkpoint", responses=_admin_documented())
async def load_checkpoint(body: LoadCheckpointRequest, request: Request) -> CheckpointInfo:
    return await services(request).admin.load(body)


@router.post("/v1/unload_checkpoint", responses=_admin_documented())
async def unload_checkpoint(body: UnloadCheckpointRequest, request: Request) -> CheckpointInfo:
    return await services(request).admin.unload(body)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while this process can serve (the engine loading included); 503 once the
    engine failed, so a supervisor restarts the process."""
    if services(request).engine.failed:
        return JSONResponse({"status": "failed"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    s = services(request)
    if s.engine.ready:
        return JSONResponse(
            {
                "status": "ready",
                "models": s.store.names(),
                "requests_in_flight": s.admission.in_flight,
                "engine_unfinished_requests": s.engine.num_unfinished_requests(),
            }
        )
    status = "failed" if s.engine.failed else "starting"
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    m = services(request).metrics
    return Response(await m.render(), media_type=m.content_type)

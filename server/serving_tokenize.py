"""POST /tokenize and /detokenize in vLLM's shapes: a prompt (or messages, through the chat
template as /v1/chat/completions renders them) to token ids, and token ids back to text, for the
model a request names."""

from __future__ import annotations

from server.engine_client import RemixEngine
from server.errors import APIError
from server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from server.serving_chat import render_chat
from server.store import CheckpointStore


class ServingTokenize:
    def __init__(self, engine: RemixEngine, store: CheckpointStore) -> None:
        self.engine = engine
        self.store = store

    async def require_model(self, name: str | None) -> None:
        """The named model is served (404 otherwise) and the tokenizer is loaded (503 before);
        one tokenizer serves every model, so nothing is loaded."""
        await self.store.resolve(name)
        if self.engine.tokenizer is None:
            raise APIError(503, "The engine is not ready yet", "server_error",
                           code="engine_not_ready", headers={"Retry-After": "5"})  # fmt: skip

    async def tokenize(
        self, req: TokenizeCompletionRequest | TokenizeChatRequest
    ) -> TokenizeResponse:
        await self.require_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            ids = await render_chat(self.engine, req.messages, req.add_generation_prompt)
        else:
            ids = await self.engine.tokenize(req.prompt, req.add_special_tokens)
        return TokenizeResponse(
            count=len(ids),
            max_model_len=self.engine.max_model_len,
            tokens=ids,
            token_strs=self.engine.token_strings(ids) if req.return_token_strs else None,
        )

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        await self.require_model(req.model)
        vocab = self.engine.vocab_size
        bad = [t for t in req.tokens if t >= vocab]
        if bad:
            raise APIError(400, f"tokens: token id {bad[0]} is outside the vocabulary "
                           f"(0..{vocab - 1})", param="tokens", code="invalid_value")  # fmt: skip
        return DetokenizeResponse(prompt=await self.engine.detokenize(req.tokens))

"""POST /v1/chat/completions: messages through the tokenizer's chat template; choice j is
engine request j."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from server.engine_client import RemixEngine
from server.errors import APIError
from server.logprobs import chat_logprobs, walk
from server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChunk,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    NamedToolChoice,
    RemixInfo,
    Usage,
)
from server.serving import Job, ServingBase
from server.tools import answer_tool_calls


async def render_chat(
    engine: RemixEngine, messages: list[ChatMessage], add_generation_prompt: bool = True
) -> list[int]:
    """The prompt token ids of `messages` through the model's chat template (a 400 naming
    `messages` when there is none or it fails)."""
    if not engine.has_chat_template:
        raise APIError(
            400,
            "This model has no chat template; use /v1/completions",
            param="messages",
            code="no_chat_template",
        )
    dicts = [m.model_dump(exclude_none=True) for m in messages]
    try:
        return await engine.apply_chat_template(dicts, add_generation_prompt)
    except Exception as e:
        raise APIError(400, f"messages: chat template failed: {e}", param="messages") from None


class ServingChat(ServingBase[ChatCompletionRequest]):
    endpoint = "/v1/chat/completions"
    id_prefix = "chatcmpl"
    chunk_class = ChatCompletionStreamChunk

    async def prompt_token_ids(self, req: ChatCompletionRequest) -> list[list[int]]:
        ids = await render_chat(self.engine, req.messages)
        if not ids:
            raise APIError(400, "messages render to an empty prompt", param="messages")
        return [ids]

    def logprobs(self, o: Any) -> ChatLogprobs | None:
        if o.logprobs is None:
            return None
        return chat_logprobs(walk(o.token_ids, o.logprobs, self.engine.decode_token))

    def stream_chunk(self, job: Job[ChatCompletionRequest], j: int, out: Any) -> BaseModel:
        (o,) = out.outputs
        first = j not in job.texts_sent
        job.texts_sent[j] = job.texts_sent.get(j, 0) + len(o.text)
        choice = ChatStreamChoice(
            index=j,
            delta=ChatDelta(role="assistant" if first else None, content=o.text),
            logprobs=self.logprobs(o),
            finish_reason=o.finish_reason,
        )
        return ChatCompletionStreamChunk(**job.header(), choices=[choice])

    def response_body(
        self,
        job: Job[ChatCompletionRequest],
        finals: list[Any],
        usage: Usage,
        remix: RemixInfo | None,
    ) -> BaseModel:
        choices = [self.choice(job.req, j, out.outputs[0]) for j, out in enumerate(finals)]
        return ChatCompletionResponse(**job.header(), choices=choices, usage=usage, remix=remix)

    def choice(self, req: ChatCompletionRequest, j: int, o: Any) -> ChatChoice:
        """Choice j: text, or (tool_choice forcing calls) the tool calls its text holds; as
        OpenAI answers, finish_reason "tool_calls" for "required", "stop" for a named function,
        and text that is not a complete call (cut off: "length") stays content."""
        message = ChatResponseMessage(content=o.text)
        finish = o.finish_reason
        forced = req.forced_tools()
        named = (
            req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
        )
        calls = answer_tool_calls(o.text, named) if forced is not None else None
        if calls is not None:
            message = ChatResponseMessage(content=None, tool_calls=calls)
            finish = "tool_calls" if named is None and finish == "stop" else finish
        return ChatChoice(index=j, message=message, logprobs=self.logprobs(o), finish_reason=finish)

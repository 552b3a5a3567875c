"""POST /v1/completions: prompts as texts or token ids, choice j answers prompt j // n."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from server.errors import APIError
from server.logprobs import completion_logprobs, walk
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChunk,
    RemixInfo,
    Usage,
)
from server.serving import Job, ServingBase


def _empty_prompt() -> APIError:
    return APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")


class ServingCompletion(ServingBase[CompletionRequest]):
    endpoint = "/v1/completions"
    id_prefix = "cmpl"
    chunk_class = CompletionStreamChunk

    async def prompt_token_ids(self, req: CompletionRequest) -> list[list[int]]:
        prompts = req.prompts()
        if not prompts:
            raise _empty_prompt()
        out: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                if p == "":
                    raise _empty_prompt()
                ids = await self.engine.tokenize(p)
            else:
                ids = list(p)
                if not ids:
                    raise _empty_prompt()
                vocab = self.engine.vocab_size
                bad = [t for t in ids if t < 0 or t >= vocab]
                if bad:
                    raise APIError(
                        400,
                        f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                        param="prompt",
                        code="invalid_value",
                    )
            out.append(ids)
        return out

    async def prepare(self, job: Job[CompletionRequest]) -> None:
        if job.req.echo:  # the prompt texts, put before each prompt's choices
            job.extra = [await self.engine.detokenize(p) for p in job.prompts]

    def choice(self, job: Job[CompletionRequest], j: int, out: Any) -> CompletionChoice:
        """Choice j from its engine output: the whole answer, or a streamed delta that follows
        the text already sent (the echoed prompt goes before the first part)."""
        (o,) = out.outputs
        req, i = job.req, j // job.req.n
        offset = job.texts_sent.get(j, 0)
        echo = job.extra[i] if req.echo and j not in job.texts_sent else None
        text = echo + o.text if echo is not None else o.text
        lp = None
        if req.logprobs is not None:
            decode = self.engine.decode_token
            start = offset + (len(echo) if echo is not None else 0)
            lp = completion_logprobs(walk(o.token_ids, o.logprobs, decode), start)
            if echo is not None:
                prompt_lp = completion_logprobs(
                    walk(job.prompts[i], out.prompt_logprobs, decode), offset
                )
                lp = CompletionLogprobs(
                    **{
                        k: getattr(prompt_lp, k) + getattr(lp, k)
                        for k in CompletionLogprobs.model_fields
                    }
                )
        job.texts_sent[j] = offset + len(text)
        return CompletionChoice(text=text, index=j, logprobs=lp, finish_reason=o.finish_reason)

    def stream_chunk(self, job: Job[CompletionRequest], j: int, out: Any) -> BaseModel:
        return CompletionStreamChunk(**job.header(), choices=[self.choice(job, j, out)])

    def response_body(
        self,
        job: Job[CompletionRequest],
        finals: list[Any],
        usage: Usage,
        remix: RemixInfo | None,
    ) -> BaseModel:
        choices = [self.choice(job, j, out) for j, out in enumerate(finals)]
        return CompletionResponse(**job.header(), choices=choices, usage=usage, remix=remix)

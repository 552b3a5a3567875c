"""Log-probabilities: one walk over vLLM's per-token {token id: Logprob} entries, and the two
shapes OpenAI gives them (completions: parallel lists with text offsets; chat: one object per
token with its top alternatives)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from server.protocol import ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs

Decode = Callable[[int], str]  # one token id -> its text


@dataclass
class TokenLogprob:
    text: str
    logprob: float | None  # None for a prompt's first token (nothing predicts it)
    top: list[tuple[str, float]]  # the most likely tokens at this position, with their logprobs


def walk(
    token_ids: Sequence[int], logprobs: Sequence[Any] | None, decode: Decode
) -> list[TokenLogprob]:
    """`logprobs[i]` is vLLM's {id: Logprob} for token i (None for a prompt's first token); a
    token's text is vLLM's decoded_token when it has one."""

    def text(token_id: int, lp: Any) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return decode(token_id)

    out = []
    for i, token_id in enumerate(token_ids):
        entry = logprobs[i] if logprobs is not None and i < len(logprobs) else None
        chosen = entry.get(token_id) if entry else None
        out.append(
            TokenLogprob(
                text=text(token_id, chosen),
                logprob=chosen.logprob if chosen is not None else None,
                top=[(text(t, lp), lp.logprob) for t, lp in entry.items()] if entry else [],
            )
        )
    return out


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """OpenAI completion logprobs; text offsets start at `offset`."""
    out = CompletionLogprobs()
    for t in tokens:
        out.tokens.append(t.text)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append(dict(t.top) if t.top else None)
        out.text_offset.append(offset)
        offset += len(t.text)
    return out


def chat_logprobs(tokens: list[TokenLogprob]) -> ChatLogprobs:
    """OpenAI chat logprobs: each token with its UTF-8 bytes and its top alternatives."""
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=t.text,
                logprob=t.logprob,
                bytes=list(t.text.encode()),
                top_logprobs=[
                    ChatTopLogprob(token=s, logprob=x, bytes=list(s.encode())) for s, x in t.top
                ],
            )
            for t in tokens
        ]
    )

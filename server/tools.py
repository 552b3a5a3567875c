"""Forced tool calls (`tool_choice` "required" or a named function): the JSON schema the answer is
decoded under (vLLM's own, as for any model) and the answer turned into `tool_calls`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from server.protocol import FunctionCall, ToolCall

if TYPE_CHECKING:
    from server.protocol import Tool


def tool_calls_schema(tools: list[Tool], named: bool, parallel: bool | None) -> dict[str, Any]:
    """A named function: its parameter schema (the answer is its arguments). "required": a
    JSON array of {"name", "parameters"} objects, one per call, each naming one of `tools`."""
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionNamedToolChoiceParam,
        ChatCompletionToolsParam,
    )
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    vllm_tools = [ChatCompletionToolsParam.model_validate(t.model_dump()) for t in tools]
    choice: Any = "required"
    if named:
        choice = ChatCompletionNamedToolChoiceParam.model_validate(
            {"function": {"name": tools[0].function.name}}
        )
    return get_json_schema_from_tools(choice, vllm_tools, parallel)  # type: ignore[return-value]


def answer_tool_calls(text: str, named: str | None) -> list[ToolCall] | None:
    """The tool calls an answer decoded under `tool_calls_schema` holds; None when the text is
    not a complete call (cut off by max_tokens)."""
    if named is not None:
        return (
            [ToolCall(function=FunctionCall(name=named, arguments=text))]
            if _is_json(text)
            else None
        )
    try:
        calls = json.loads(text)
        return [
            ToolCall(function=FunctionCall(name=c["name"], arguments=json.dumps(c["parameters"])))
            for c in calls
        ]
    except (ValueError, TypeError, KeyError):
        return None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True

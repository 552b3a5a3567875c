"""The HTTP API contract: OpenAI-compatible request, response and stream-chunk bodies.

Requests forbid unknown fields (a typo is a 400 naming the field, never silently ignored);
OpenAI fields this server does not implement are refused by name (`suffix`, `best_of` other
than n, `tool_choice: "auto"`); every string must be valid Unicode (a lone UTF-16 surrogate is a
400 naming its field). Each request model owns its defaults and its conversion to vLLM's
SamplingParams (`to_sampling_params`), structured-output constraint included (`constraint`).
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

# ---------------------------------------------------------------------------------------------
# Requests


def _valid_unicode(text: str) -> str:
    """JSON escapes can spell strings that are not Unicode text (a lone surrogate such as
    "\\ud800"): no tokenizer takes them and no response can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "invalid_unicode", "invalid Unicode (a lone UTF-16 surrogate)"
        ) from None
    return text


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
TokenId = Annotated[StrictInt, Field(ge=0, lt=2**63)]  # the vocabulary is checked later


def _unsupported(name: str) -> PydanticCustomError:
    return PydanticCustomError(
        "unsupported", "'{name}' is not supported by this server", {"name": name}
    )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class RemixOptions(BaseModel):
    """The ReMix extension of a request (`"remix": {...}`)."""

    model_config = ConfigDict(extra="forbid")

    return_routing: StrictBool = False  # add this request's routing summary to the response


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint that the answer is decoded under
    (constrained decoding masks the logits; routing is untouched)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_schema: dict[str, Any] | Text | None = Field(
        default=None, alias="json", description="a JSON schema the answer follows"
    )
    regex: Text | None = Field(default=None, description="a regular expression the answer matches")
    choice: list[Text] | None = Field(
        default=None, min_length=1, description="the answer is one of these strings"
    )
    grammar: Text | None = Field(
        default=None, description="an EBNF (GBNF) or Lark grammar the answer follows"
    )
    json_object: Literal[True] | None = Field(default=None, description="any JSON object")

    @model_validator(mode="after")
    def _one_constraint(self) -> StructuredOutputs:
        kinds = ("json_schema", "regex", "choice", "grammar", "json_object")
        given = [k for k in kinds if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "exactly one of json, regex, choice, grammar, json_object is required"
                f" (got {len(given)})"
            )
        return self

    def to_params(self) -> StructuredOutputsParams:
        from vllm.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams(
            json=self.json_schema,
            regex=self.regex,
            choice=self.choice,
            grammar=self.grammar,
            json_object=self.json_object,
        )


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(default=1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: Text | None = None
    # vLLM extensions
    top_k: StrictInt = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    ignore_eos: StrictBool = False
    stop_token_ids: list[TokenId] | None = None
    remix: RemixOptions | None = None
    # OpenAI's logit_bias: token id (as a string) -> bias added to its logit before sampling
    logit_bias: dict[Text, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    # vLLM extensions: sample only among these token ids; never generate these words
    allowed_token_ids: list[TokenId] | None = Field(default=None, min_length=1)
    bad_words: list[Text] | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isascii() or not key.isdigit():
                raise PydanticCustomError(
                    "token_id", "keys must be token ids (decimal integers), not {key!r}",
                    {"key": key},
                )  # fmt: skip
        return value

    @model_validator(mode="after")
    def _check_stream_options(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def return_routing(self) -> bool:
        return self.remix is not None and self.remix.return_routing

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    # What each endpoint fills in differently (overridden below).
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def default_max_tokens(self, room: int) -> int:
        """max_tokens when the request names none; `room` is what the context has left."""
        return room

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(logprobs per generated token, logprobs per prompt token) for vLLM; None: none."""
        return None, None

    def token_ids(self) -> dict[str, list[int]]:
        """The token ids the request names, by field (checked against the vocabulary)."""
        named = {
            "logit_bias": [int(k) for k in self.logit_bias or {}],
            "allowed_token_ids": self.allowed_token_ids or [],
            "stop_token_ids": self.stop_token_ids or [],
        }
        return {name: ids for name, ids in named.items() if ids}

    def constraint(self) -> tuple[str, StructuredOutputsParams] | None:
        """The structured-output constraint on the answer and the field it comes from."""
        if self.structured_outputs is None:
            return None
        return "structured_outputs", self.structured_outputs.to_params()

    def to_sampling_params(self, max_tokens: int, routing_key: str, slot: int) -> SamplingParams:
        """The SamplingParams of one choice (the server fans out n choices itself), for the
        checkpoint in engine `slot`. Raises vLLM's own ValueError/TypeError for combinations it
        refuses."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from remix_infer.vllm_plugin.engine import CHECKPOINT_SLOT_KEY
        from remix_infer.vllm_plugin.worker import ROUTING_KEY

        extra_args: dict[str, Any] = {CHECKPOINT_SLOT_KEY: slot}
        if self.return_routing:
            extra_args[ROUTING_KEY] = routing_key

        logprobs, prompt_logprobs = self.logprob_counts()
        constraint = self.constraint()
        return SamplingParams(
            n=1,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop_list(),
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            structured_outputs=constraint[1] if constraint else None,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            extra_args=extra_args,
        )


Prompt = Text | list[Text] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    echo: StrictBool = False
    # unsupported OpenAI fields, accepted only at their neutral values
    suffix: Text | None = None
    best_of: StrictInt | None = None

    @field_validator("suffix")
    @classmethod
    def _refuse_suffix(cls, value: str | None) -> str | None:
        if value:
            raise _unsupported("suffix")
        return value

    @field_validator("best_of")
    @classmethod
    def _refuse_best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise _unsupported("best_of")
        return value

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of texts or a list of token-id lists (never empty lists)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def default_max_tokens(self, room: int) -> int:
        return min(16, room)  # OpenAI's default for completions

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo and self.logprobs is not None else None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text
    name: Text | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Text = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text (no constraint), any JSON object, or a JSON schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' (and only then)")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; absent: no arguments
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


def _refuse_auto_tool_choice(value: Any) -> Any:
    if value == "auto":
        raise PydanticCustomError(
            "unsupported",
            "tool_choice 'auto' is not supported: the model would decide whether to call a tool,"
            " which needs a parser for its own tool-call format. Use 'required' or a named"
            " function (the arguments are then decoded under the function's parameter schema),"
            " or 'none'",
        )
    return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Annotated[
        Literal["none", "auto", "required"] | NamedToolChoice | None,
        AfterValidator(_refuse_auto_tool_choice),
    ] = None
    parallel_tool_calls: StrictBool | None = None

    @field_validator("response_format")
    @classmethod
    def _one_format(cls, value: ResponseFormat | None, info: ValidationInfo) -> Any:
        if value is not None and value.type != "text" and info.data.get("structured_outputs"):
            raise ValueError("response_format and structured_outputs cannot both be given")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _forced_tools_exist(cls, value: Any, info: ValidationInfo) -> Any:
        if value in (None, "none"):
            return value
        names = [t.function.name for t in info.data.get("tools") or []]
        if not names:
            raise ValueError("tool_choice needs tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise ValueError(f"'{value.function.name}' is not in tools")
        rf = info.data.get("response_format")
        if info.data.get("structured_outputs") or (rf is not None and rf.type != "text"):
            raise ValueError("forced tool calls cannot be combined with another output format")
        if info.data.get("stream"):
            raise ValueError("forced tool calls are not streamed: use stream false")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def forced_tools(self) -> list[Tool] | None:
        """The tools the answer must call (tool_choice "required": any of them; a named
        function: that one); None when the answer is text."""
        choice = self.tool_choice
        if choice == "required":
            return self.tools or []
        if isinstance(choice, NamedToolChoice):
            return [t for t in self.tools or [] if t.function.name == choice.function.name]
        return None

    def json_response_format(self) -> StructuredOutputs | None:
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return StructuredOutputs(json_object=True)
        return StructuredOutputs(json=rf.json_schema.schema_)  # type: ignore[union-attr]

    def constraint(self) -> tuple[str, StructuredOutputsParams] | None:
        from server.tools import tool_calls_schema

        forced = self.forced_tools()
        if forced is not None:
            named = isinstance(self.tool_choice, NamedToolChoice)
            schema = tool_calls_schema(forced, named, self.parallel_tool_calls)
            return "tools", StructuredOutputs(json=schema).to_params()
        rf = self.json_response_format()
        if rf is not None:
            return "response_format", rf.to_params()
        return super().constraint()

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None


class TokenizeCompletionRequest(BaseModel):
    """vLLM's POST /tokenize with a prompt."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    prompt: Text
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeChatRequest(BaseModel):
    """vLLM's POST /tokenize with messages, rendered by the chat template as chat requests are."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = False  # accepted for vLLM's clients; the template decides
    return_token_strs: StrictBool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


# ---------------------------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class RoutingSummary(BaseModel):
    """Which LoRAs one request's tokens selected, per layer and adapted module."""

    tokens: int  # tokens routed through each adapted module (see docs/engine.md)
    num_loras: int
    top_k: int
    # layers[i][module]: times each of the module's LoRAs was selected (each token selects top_k)
    layers: list[dict[str, list[int]]]


class RemixInfo(BaseModel):
    """The ReMix extension of a response; present only when the request asked for it."""

    routing: RoutingSummary


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "abort", "tool_calls"] | None


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    remix: RemixInfo | None = None


class CompletionStreamChunk(CompletionResponse):
    """One SSE `data:` event of a streamed completion (choices empty in the final chunk that
    carries usage and/or the routing summary)."""


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: new_id("call"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    logprob: float | None  # type: ignore[assignment]
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    remix: RemixInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionStreamChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    remix: RemixInfo | None = None


def response_json(body: BaseModel) -> dict[str, Any]:
    """A response or chunk as JSON, without the `remix` extension when the client did not ask for
    it (so plain OpenAI clients see plain OpenAI bodies)."""
    data = body.model_dump()
    if data.get("remix", 0) is None:
        del data["remix"]
    return data


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "remix-serve"
    root: str | None = None  # the checkpoint's directory (the base model's, for the base model)
    parent: str | None = None  # the base model's directory, for a checkpoint
    max_model_len: int | None = None
    # where the model is (server/store.py): loaded (in a slot), host (its tensors in host
    # memory), available (a checkpoint folder, loaded on first use)
    status: Literal["loaded", "host", "available"] | None = None
    slot: int | None = None  # the engine's checkpoint slot, when loaded (none for the base model)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------------
# Admin: checkpoints loaded and unloaded while serving


class LoadCheckpointRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(min_length=1, pattern=r"^[^\s,]+$")  # the model name clients will send
    path: Text = Field(min_length=1)  # a checkpoint directory on the server's file system


class UnloadCheckpointRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text
    # How long to wait for the checkpoint's requests in flight (new ones are refused meanwhile);
    # past it the unload is refused (409) and the checkpoint serves on. 0: refuse at once.
    timeout_s: float = Field(default=30.0, ge=0.0, le=600.0)


class CheckpointInfo(BaseModel):
    """The answer of a load or unload."""

    name: str
    path: str
    slot: int
    status: Literal["loaded", "unloaded"]
    seconds: float  # how long the engine took (validation included for a load)

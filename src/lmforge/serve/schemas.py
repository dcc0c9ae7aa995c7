"""Request and response bodies of the OpenAI-compatible API (pydantic only: no fastapi, no torch).

Requests are validated strictly: a JSON string is not a number, ``true`` is not an integer, ``NaN`` is not
a temperature, unknown fields are refused (a typo such as ``max_token`` would otherwise be ignored silently).
OpenAI parameters lmforge does not implement (``suffix``, tools) are accepted only at their neutral value,
so a client that always sends them keeps working. ``num_beams``, ``top_k`` and ``guided_choice`` are
lmforge extensions.

A field the request leaves out (or sends as ``null``) is not in ``model_fields_set``: the server then
takes the model's ``generation_config.json`` default, else the default written here.

Every error is the OpenAI error object ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmforge.config import LmforgeError

MAX_PROMPTS = 64
"""Prompts in one completions request (a list of strings or of token-id lists)."""
MAX_N = 16
"""Largest ``n`` (choices per prompt) and ``num_beams``."""
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20
"""Largest ``logprobs`` (completions) / ``top_logprobs`` (chat)."""
MAX_CHOICES = 256
"""Labels in one ``guided_choice``."""


class ApiError(LmforgeError):
    """A request the server refuses; rendered as the OpenAI error object with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(ge=1, le=1_000_000)]
"""The schema's bound; the server's own limit and the model's context are checked against the prompt."""
TokenId = Annotated[int, Field(ge=0)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send a last chunk (before ``[DONE]``) with ``usage`` and no choices."""


class JsonSchemaSpec(_Strict):
    """``response_format.json_schema``: the schema a reply must validate against."""

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ResponseFormat(_Strict):
    """``{"type": "text"}`` (free text), ``{"type": "json_object"}`` (any JSON object) or ``{"type":
    "json_schema", "json_schema": {"schema": {...}}}``: constrained decoding makes the reply parse (and
    validate) unless ``max_tokens`` ends it first (``finish_reason`` ``"length"``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format: give 'json_schema' exactly when type is 'json_schema'")
        return self


class _Sampling(_Strict):
    """Decoding parameters common to both endpoints. ``null`` means the default, as with OpenAI."""

    model: str | None = None
    """The served model's id (``GET /v1/models``); may be left out since one model is served."""
    temperature: Temperature | None = 1.0
    """0 means greedy decoding; above 0 samples."""
    top_p: TopP | None = 1.0
    top_k: Annotated[int, Field(ge=0)] | None = 0
    """lmforge extension: keep the ``top_k`` most likely tokens when sampling (0: off)."""
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    num_beams: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    """lmforge extension: beam search with this many beams (``n`` <= ``num_beams``; sampled beams when
    ``temperature`` > 0)."""
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    presence_penalty: Penalty | None = 0.0
    """OpenAI's: subtract this from the score of every token already generated."""
    frequency_penalty: Penalty | None = 0.0
    """OpenAI's: subtract this times the token's count so far in the completion."""
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    """Token id (as a string) -> bias added to its score, in [-100, 100]."""
    response_format: ResponseFormat | None = None
    guided_choice: (
        Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)] | None
    ) = None
    """lmforge extension (as vLLM's): the reply is exactly one of these strings (classification labels)."""
    user: str | None = None

    @model_validator(mode="after")
    def _defaults(self) -> _Sampling:
        # an explicit null means the default: fill it in so that the server never sees None here, and
        # forget that it was sent, so that the model's own default applies
        fields = type(self).model_fields
        for name in _NULL_IS_DEFAULT:
            if name in fields and getattr(self, name) is None:
                object.__setattr__(self, name, fields[name].default)
                self.model_fields_set.discard(name)
        return self

    def given(self, name: str) -> bool:
        """Whether the request set ``name`` (not left out, not null)."""
        return name in self.model_fields_set and getattr(self, name) is not None


_NULL_IS_DEFAULT = (
    "temperature",
    "top_p",
    "top_k",
    "n",
    "num_beams",
    "stream",
    "presence_penalty",
    "frequency_penalty",
    "echo",
)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: (
        str
        | Annotated[list[str], Field(max_length=MAX_PROMPTS)]
        | list[TokenId]
        | Annotated[list[list[TokenId]], Field(max_length=MAX_PROMPTS)]
    )
    """A string, a list of strings, a list of token ids, or a list of token-id lists (none of them empty)."""
    max_tokens: MaxTokens | None = 16
    echo: bool | None = False
    """Prepend the prompt to each completion."""
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """Return each token's log-probability and this many most likely alternatives."""
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    """Accepted only as null or equal to ``n``."""
    suffix: str | None = None
    """Accepted only as null (not implemented)."""


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=256)]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_tokens: MaxTokens | None = None
    """Default: what is left of the context, within the server's limit."""
    max_completion_tokens: MaxTokens | None = None
    """The newer name of ``max_tokens``; give one of the two."""
    logprobs: bool | None = None
    """Return each token's log-probability (``choices[i].logprobs.content``)."""
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """With ``logprobs``: this many most likely alternatives per token."""
    tools: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None
    """Accepted only empty (not implemented)."""
    tool_choice: Literal["none"] | None = None


class TokenizeRequest(_Strict):
    """``POST /tokenize``: a prompt, or chat messages (rendered with the chat template first)."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class DetokenizeRequest(_Strict):
    """``POST /detokenize``: token ids back to text."""

    model: str | None = None
    tokens: Annotated[list[TokenId], Field(max_length=1_000_000)]


# -------------------------------------------------------------------------------------- responses
class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int | None
    """The model's context in tokens (``null``: unbounded)."""


class DetokenizeResponse(BaseModel):
    prompt: str


FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """``/v1/completions``' ``logprobs``: per token its text, log-probability, offset in ``text`` and the
    most likely alternatives (text -> log-probability)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    """Also the shape of a streamed chunk (``object`` = ``text_completion``, ``usage`` only on the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One ``data:`` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmforge"
    max_model_len: int | None = None
    """The model's context in tokens (``null``: unbounded, e.g. a recurrent model)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    active: int
    """Requests holding a slot now."""
    max_concurrency: int
    queued_requests: int
    """Requests waiting for the generation worker."""
    generate_calls: int
    """Batched generate calls made so far."""
    requests_generated: int
    """Requests those calls served (``requests_generated / generate_calls``: the mean batch, in requests)."""


class NotReady(BaseModel):
    """``/health`` while the model loads (503), or after loading failed."""

    status: Literal["loading", "failed"]
    model: str
    error: str | None
    """Why loading failed (one line)."""


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorObject

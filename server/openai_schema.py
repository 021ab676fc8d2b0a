"""Request and response models of the OpenAI-compatible API, for validation and the OpenAPI doc.

Requests are validated just enough for calibserve to read what it reads (types of the fields it
uses) with OpenAI-shaped 400s; ranges and every other field are the engine's to judge and pass
through untouched (`extra="allow"`), so vLLM's own extensions keep working and a request vLLM
refuses gets vLLM's own error, unchanged. Responses are returned
as the upstream's JSON plus calibserve's fields; their models here document that shape (including
`confidence` and `calibserve`) for clients and for schema-driven fuzzing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_TOP_LOGPROBS = 20


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Open):
    role: StrictStr = Field(..., min_length=1, description="system | user | assistant | tool ...")
    content: StrictStr | list[dict[str, Any]] | None = None


class StreamOptions(_Open):
    include_usage: StrictBool | None = None


class _SamplingParams(_Open):
    model: StrictStr = Field(..., min_length=1, description="a model name from /v1/models")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(1, description="choices to generate (bounded by the server)")
    max_tokens: StrictInt | None = Field(None, description="0 with `echo` scores the prompt only")
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    user: StrictStr | None = None


class ChatCompletionRequest(_SamplingParams):
    """POST /v1/chat/completions. Unknown fields are forwarded to the upstream unchanged."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: StrictBool | None = Field(
        False, description="return token logprobs (calibserve always computes them upstream)"
    )
    top_logprobs: StrictInt | None = Field(None, description="vLLM's --max-logprobs bounds it")
    prompt_logprobs: StrictInt | None = None
    echo: StrictBool | None = None
    max_completion_tokens: StrictInt | None = None


class CompletionRequest(_SamplingParams):
    """POST /v1/completions. Unknown fields are forwarded to the upstream unchanged."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        ..., description="text, texts, or token ids"
    )
    logprobs: StrictInt | None = Field(None, description="vLLM's --max-logprobs bounds it")
    prompt_logprobs: StrictInt | None = None
    echo: StrictBool | None = None
    suffix: StrictStr | None = None


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: was the response with this id right?"""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr = Field(..., min_length=1, max_length=4096,
                          description="the `id` of a calibserve chat/completions response")
    correct: StrictBool | None = Field(None, description="true if the answer was right")
    score: Literal[0, 1] | None = Field(None, description="alternative to `correct`: 1 or 0")
    choice: StrictInt = Field(0, ge=0, description="which choice of an n>1 response (default 0)")


# --- responses (documentation) -----------------------------------------------------------------

class ConfidenceModel(BaseModel):
    score: float = Field(..., ge=0, le=1, description="calibrated probability the answer is right")
    raw: float = Field(..., ge=0, le=1, description="uncalibrated confidence from the logprobs")
    method: str = Field(..., description="mean | min | first | quantile | answer")
    calibrated: bool = Field(..., description="true when `score` went through the method's own "
                             "calibrator; false: the method has none and `score` is `raw`")


class TierJudgment(_Open):
    tier: str = Field(..., description="the tier whose answer a policy judged")
    confidence: float | None = Field(None, description="its calibrated confidence (least "
                                     "confident choice) the policy read")
    threshold: float | None = Field(None, description="the threshold it was judged by")
    escalate: bool = Field(..., description="true: a stronger tier was asked for the answer")


class CalibserveInfo(_Open):
    served_by: str = Field(..., description="the tier (model) that produced the answer")
    escalated: bool
    primary_confidence: float | None = None
    threshold: float | None = None
    escalation_error: str | None = None
    reason: str | None = None
    judgments: list[TierJudgment] | None = Field(
        None, description="every tier a policy judged, in order: the primary, then (a route of "
        "3+ tiers) each middle tier that answered, by its own threshold")


class ChatChoice(_Open):
    index: int
    message: dict[str, Any]
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None
    confidence: ConfidenceModel


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None
    confidence: ConfidenceModel


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int


class ChatCompletionResponse(_Open):
    id: str = Field(..., description="signed id (`chatcmpl-...`) to send back to /v1/feedback")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    calibserve: CalibserveInfo


class CompletionResponse(_Open):
    id: str = Field(..., description="signed id (`cmpl-...`) to send back to /v1/feedback")
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    calibserve: CalibserveInfo


class FeedbackResponse(BaseModel):
    id: str
    model: str
    accepted: bool = True
    confidence: float
    correct: bool
    bin: int
    method: str | None = None  # the confidence method the feedback is counted under


class ModelCard(_Open):
    """The engine's card (vLLM's fields), `id` the served name; open to whatever it adds."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = Field("vllm", description="the engine's; `calibserve` when it cannot say")
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[dict[str, Any]] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = Field(None, description="the HTTP status, as vLLM's")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- routes passed through to the engine (validated only as far as calibserve reads them) -----

class ResponsesRequest(_Open):
    """POST /v1/responses (the Responses API). Everything but `model`, `stream`, `include` and
    `top_logprobs` is the engine's to judge and passes through unchanged."""

    model: StrictStr | None = Field(None, description="a model name from /v1/models (default: "
                                    "the first)")
    input: StrictStr | list[dict[str, Any]] = Field(..., description="text or input items")
    stream: StrictBool | None = False
    include: list[StrictStr] | None = None
    top_logprobs: StrictInt | None = None


class ResponseObject(_Open):
    id: str = Field(..., description="the engine's `resp_...` id (kept: previous_response_id and "
                    "GET /v1/responses/{id} use it)")
    object: Literal["response"] = "response"
    output: list[dict[str, Any]]
    confidence: ConfidenceModel
    calibserve: CalibserveInfo


class TokenizeRequest(_Open):
    """POST /tokenize: `prompt` (text) or `messages` (chat), passed through to the engine."""

    model: StrictStr | None = None


class DetokenizeRequest(_Open):
    """POST /detokenize: `tokens` (ids), passed through to the engine."""

    model: StrictStr | None = None
    tokens: list[StrictInt]

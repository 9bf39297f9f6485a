"""The OpenAI request bodies the server accepts, and OpenAI's error shape."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """Answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------- request bodies


class _Strict(BaseModel):
    # Strict: "5" is not an int and 1 is not a bool. Unknown fields (user, metadata, ...) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    # Greedy unless asked: answers then match `tunelab generate` (OpenAI's own default is 1.0).
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    raw: bool = False  # tunelab extension: send the prompt as-is, without the run's template
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatRequest(Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def describe_invalid(errors: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    """pydantic/FastAPI validation errors -> (message, param, code) for a 400."""
    err = errors[0]
    if err["type"] == "json_invalid":
        detail = err.get("ctx", {}).get("error", "parse error")
        return f"request body is not valid JSON ({detail})", None, "invalid_json"
    loc = _field_path(err["loc"])
    if not loc:
        return "request body must be a JSON object", None, "invalid_value"
    # A union (prompt: str | list[str]) fails once per member; say all of what would have been accepted.
    reasons = list(dict.fromkeys(e["msg"] for e in errors if _field_path(e["loc"]) == loc))
    return f"{'.'.join(loc)}: {' or '.join(reasons)}", loc[0], "invalid_value"


def _field_path(loc: tuple) -> list[str]:
    """('body', 'prompt', 'list[str]', 0) -> ['prompt', '0']: union members add their type names."""
    return [str(p) for p in loc[1:] if isinstance(p, int) or ("[" not in str(p) and str(p) not in _TYPES)]


_TYPES = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "TextPart"}

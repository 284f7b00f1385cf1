"""The chat protocol: what the panel / `tas chat` (engine.chat.client) and the chat worker
(engine.chat.worker) say to each other, one JSON object per line.

Light module: stdlib + pydantic only (never torch or transformers); the worker, the client, the Chat tab
and `tas chat` all read their types, parameter bounds and defaults from here.

Requests (client → worker stdin), told apart by `op`:

    {"op": "generate", "id": "r1", "messages": [{"role", "content"}, ...], "params": {...}}
    {"op": "stop", "id": "r1"}                      no id: stop whatever runs or waits
    {"op": "load", "model": NAME, "adapter": PATH or null}

Replies (worker stdout → client), told apart by `kind`:

    {"kind": "ready", "model", "adapter", "device", "dtype", "context", "template", "load_s", "threads", "pid"}
    {"kind": "token", "id", "text"}                 a piece of the reply (one or more tokens)
    {"kind": "end", "id", "tokens", "ttft_s", "tokens_per_s", "elapsed_s", "prompt_tokens", "stopped", "finish"}
    {"kind": "error", "id"?, "message", "fatal"?, "op"?, "model"?, "exit_code"?}

A field that is null may be left out (`encode` leaves it out). `GenerationParams` holds the one set of
sampling bounds (`param_bounds` reads them back for help texts and tooltips); `DEFAULT_PARAMS` is what the
panel and `tas chat` start from. No pydantic error escapes: `parse_request`, `parse_reply`, `make` and
`make_params` raise `ProtocolError`, whose message names the field (`params.temperature must be between 0
and 2, got 5`). `encode_token` writes a token line without building a model (the worker's hot path).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from engine.core.fsio import dumps_line, parse_line

# ----------------------------------------------------------------------------------------------- errors


class ProtocolError(ValueError):
    """A line (or a set of params) that is not valid protocol; the message says which field and why.

    `field`: the dotted path of the first wrong field (`params.temperature`, `messages[0].role`), or None
    when the line as a whole is wrong; `id`: the request's id when the line had a usable one.
    """

    def __init__(self, message: str, field: str | None = None, id: str | None = None):
        super().__init__(message)
        self.field = field
        self.id = id


# ----------------------------------------------------------------------------------------------- params


def _id(value: Any) -> Any:
    """Ids are strings; an integer id is accepted as its decimal text (a bool is not an id)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


RequestId = Annotated[str, BeforeValidator(_id), StringConstraints(min_length=1)]
Role = Literal["system", "user", "assistant"]

MAX_TOKENS_LIMIT = 1 << 20
"""Largest max_new_tokens / min_new_tokens accepted; the worker caps them to the model's context anyway."""


class GenerationParams(BaseModel):
    """Sampling settings of one `generate`; every field optional (absent: the worker's default).

    The bounds below are the only ones: the worker refuses, and the Chat tab and `tas chat` refuse
    before sending, exactly what is outside them. Numbers are strict (no strings, no booleans).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: Annotated[float, Field(strict=True, ge=0.0, le=2.0)] | None = Field(
        None, description="0 means greedy decoding"
    )
    top_p: Annotated[float, Field(strict=True, gt=0.0, le=1.0)] | None = Field(
        None, description="nucleus sampling threshold"
    )
    top_k: Annotated[int, Field(strict=True, ge=0)] | None = Field(
        None, description="sample among the k likeliest tokens; 0: no limit"
    )
    max_new_tokens: Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS_LIMIT)] | None = Field(
        None, description="longest reply; capped to what fits in the model's context after the prompt"
    )
    min_new_tokens: Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS_LIMIT)] | None = Field(
        None, description="no end-of-sequence before this many tokens"
    )
    do_sample: Annotated[bool, Field(strict=True)] | None = Field(
        None, description="sample (true) or greedy (false); default: sample unless temperature is 0"
    )
    repetition_penalty: Annotated[float, Field(strict=True, ge=0.01, le=10.0)] | None = Field(
        None, description="1: none; above 1 discourages repeating tokens"
    )
    seed: Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)] | None = Field(
        None, description="makes sampling reproducible"
    )

    def given(self) -> dict[str, Any]:
        """The params that were set (what goes on the wire)."""
        return self.model_dump(exclude_none=True)


DEFAULT_PARAMS = GenerationParams(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=512)
"""What the Chat tab and `tas chat` start from (`max_new_tokens`: unless the config says otherwise)."""

PARAM_NAMES = tuple(GenerationParams.model_fields)


@dataclass(frozen=True)
class Bounds:
    """The accepted range of a numeric param (None: no bound on that side; `open`: the bound itself is out).

    `value in bounds` tells whether the protocol accepts it; str() is how the panel and `tas chat` show it."""

    low: float | None
    high: float | None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def __str__(self) -> str:
        """`0–2`, `> 0 and ≤ 1`, `≥ 1`."""
        low = None if self.low is None else ("> " if self.low_open else "≥ ") + _num(self.low)
        high = None if self.high is None else ("< " if self.high_open else "≤ ") + _num(self.high)
        if low and high and not self.low_open and not self.high_open:
            return f"{_num(self.low)}–{_num(self.high)}"
        return " and ".join(part for part in (low, high) if part) or "any"


def param_bounds(name: str) -> Bounds:
    """The bounds of a param, read from GenerationParams (so they are the ones validation applies)."""
    return _BOUNDS[name]


def _bounds_of(model: type[BaseModel]) -> dict[str, Bounds]:
    out = {}
    for name, schema in model.model_json_schema()["properties"].items():
        number = next((s for s in schema.get("anyOf", [schema]) if s.get("type") in ("number", "integer")), None)
        if number is None:
            continue
        low_open, high_open = "exclusiveMinimum" in number, "exclusiveMaximum" in number
        out[name] = Bounds(
            number.get("exclusiveMinimum", number.get("minimum")),
            number.get("exclusiveMaximum", number.get("maximum")),
            low_open,
            high_open,
        )
    return out


_BOUNDS = _bounds_of(GenerationParams)


def make_params(values: Mapping[str, Any] | GenerationParams | None = None, /, **changes: Any) -> GenerationParams:
    """Validated params from a mapping (or params) updated with `changes`; ProtocolError names the field."""
    base = values.given() if isinstance(values, GenerationParams) else dict(values or {})
    return make(GenerationParams, **{**base, **changes})


M = TypeVar("M", bound=BaseModel)


def make(model: type[M], /, **fields: Any) -> M:
    """`model(**fields)`, validated; ProtocolError naming the field instead of pydantic's ValidationError."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise _protocol_error(exc) from None


# --------------------------------------------------------------------------------------------- requests


class Message(BaseModel):
    """One turn of the conversation (other keys a message may carry are dropped)."""

    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)

    role: Role
    content: str


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    op: Literal["generate"] = "generate"
    id: RequestId
    messages: list[Message] = Field(min_length=1)
    params: Annotated[GenerationParams, BeforeValidator(lambda v: {} if v is None else v)] = Field(
        default_factory=GenerationParams
    )

    @field_validator("messages")
    @classmethod
    def _last_is_the_user(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        return messages


class StopRequest(BaseModel):
    """Stop one generation, or (no id) every running and waiting one."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    op: Literal["stop"] = "stop"
    id: RequestId | None = None


class LoadRequest(BaseModel):
    """Switch the worker to another model (+ adapter); `ready` or an error with `op: load` follows."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    op: Literal["load"] = "load"
    id: RequestId | None = None
    model: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    adapter: Annotated[str | None, BeforeValidator(lambda v: v or None)] = None


AnyRequest = GenerateRequest | StopRequest | LoadRequest
Request = Annotated[AnyRequest, Field(discriminator="op")]
REQUEST_OPS = ("generate", "stop", "load")

# ---------------------------------------------------------------------------------------------- replies


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)  # a newer worker may add fields


class ReadyReply(_Reply):
    """The model is loaded (at start, and after each successful `load`, then with the load's id)."""

    kind: Literal["ready"] = "ready"
    id: str | None = None
    model: str
    adapter: str | None = None
    device: str
    dtype: str
    context: int | None = None
    template: Literal["chat", "fallback"]  # the tokenizer's chat template, or a plain role: text transcript
    load_s: float
    threads: int
    pid: int


class TokenReply(_Reply):
    """A piece of the reply, as soon as it decodes (what decodes within the worker's 20 ms window after a line
    travels together in the next one)."""

    kind: Literal["token"] = "token"
    id: str
    text: str


Finish = Literal["stop", "length", "stopped"]


class EndReply(_Reply):
    """The generation is over. finish: stop (end of sequence), length (max_new_tokens), stopped (a `stop`)."""

    kind: Literal["end"] = "end"
    id: str
    tokens: int
    ttft_s: float | None = None  # request start (template, prefill) → first token
    tokens_per_s: float | None = None  # decode rate after the first token
    elapsed_s: float
    prompt_tokens: int
    stopped: bool = False
    finish: Finish


class ErrorReply(_Reply):
    """Something failed. `fatal`: the worker is gone (start a new client); `op: load`: a failed load, the old
    model still served; `exit_code`: the worker's, when the client saw it die."""

    kind: Literal["error"] = "error"
    id: str | None = None
    message: str
    fatal: bool = False
    op: Literal["load"] | None = None
    model: str | None = None
    exit_code: int | None = None


AnyReply = ReadyReply | TokenReply | EndReply | ErrorReply
Reply = Annotated[AnyReply, Field(discriminator="kind")]
REPLY_KINDS = ("ready", "token", "end", "error")

_REQUEST = TypeAdapter(Request, config=ConfigDict(defer_build=True))
_REPLY = TypeAdapter(Reply, config=ConfigDict(defer_build=True))

# --------------------------------------------------------------------------------------------- encoding


def encode(message: BaseModel) -> str:
    """A request or reply as one JSON line (newline-terminated); null fields are left out."""
    return dumps_line(message.model_dump(mode="json", exclude_none=True))


def encode_token(request_id: str, text: str) -> str:
    """`encode(TokenReply(id=request_id, text=text))`, without building a model: the worker's hot path."""
    return (
        f'{{"kind": "token", "id": {json.dumps(request_id, ensure_ascii=False)}, '
        f'"text": {json.dumps(text, ensure_ascii=False)}}}\n'
    )


def parse_request(line: str | bytes) -> AnyRequest:
    """One request line as its model; ProtocolError naming the field (and the id, when the line has one)."""
    try:
        return _REQUEST.validate_json(line)
    except ValidationError as exc:
        raise _protocol_error(exc, line, "op", REQUEST_OPS) from None


def parse_reply(line: str | bytes) -> AnyReply:
    """One reply line as its model; ProtocolError naming the field."""
    try:
        return _REPLY.validate_json(line)
    except ValidationError as exc:
        raise _protocol_error(exc, line, "kind", REPLY_KINDS) from None


# ------------------------------------------------------------------------------------------- messages


def _protocol_error(
    exc: ValidationError, line: str | bytes | None = None, tag: str | None = None, tags: tuple[str, ...] = ()
) -> ProtocolError:
    """A ValidationError as one sentence naming the field; `line`: the JSON line it came from (or None)."""
    record: dict[str, Any] | None = None
    if line is not None:
        record = parse_line(line)
        if record is None:
            return ProtocolError(f"not a JSON object: {_not_an_object(line)}")
    tag_value = record.get(tag) if record is not None and tag else None
    request_id = _id(record.get("id")) if record is not None else None
    if not isinstance(request_id, str) or not request_id:
        request_id = None
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "union_tag_not_found":
        return ProtocolError(f"`{tag}` is missing; it is one of {', '.join(tags)}", field=tag, id=request_id)
    if first["type"] == "union_tag_invalid":
        return ProtocolError(f"unknown {tag} {tag_value!r}; {tag}s are {', '.join(tags)}", field=tag, id=request_id)
    message = "; ".join(_explain(error, tag_value) for error in errors[:3])
    if len(errors) > 3:
        message += f" (and {len(errors) - 3} more)"
    return ProtocolError(message, field=_where(first["loc"], tag_value) or None, id=request_id)


def _not_an_object(line: str | bytes) -> str:
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"{exc.msg} at column {exc.colno}"
    return f"a JSON {type(value).__name__}" if value is not None else "null"


def _where(loc: tuple[Any, ...], tag_value: Any = None) -> str:
    """('generate', 'messages', 0, 'role') → messages[0].role (the union's tag left out)."""
    parts = list(loc)
    if parts and tag_value is not None and parts[0] == tag_value:
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "nullable[", "union[")) and part not in (
            "float",
            "int",
            "bool",
            "str",
        ):
            out += f".{part}" if out else str(part)
    return out


def _explain(error: dict[str, Any], tag_value: Any) -> str:
    where = _where(error["loc"], tag_value) or "the line"
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    name = where.removeprefix("params.")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than") and name in _BOUNDS:
        bounds = _BOUNDS[name]
        if bounds.low is not None and bounds.high is not None and not bounds.low_open and not bounds.high_open:
            return f"{where} must be between {_num(bounds.low)} and {_num(bounds.high)}, got {value!r}"
        return f"{where} must be {bounds}, got {value!r}"
    bound = {"greater_than_equal": "≥", "greater_than": ">", "less_than_equal": "≤", "less_than": "<"}.get(kind)
    if bound:
        limit = next(iter(ctx.values()), "?")
        return f"{where} must be {bound} {_num(limit)}, got {value!r}"
    if kind == "missing":
        return f"`{where}` is missing"
    if kind == "extra_forbidden":
        if where.startswith("params."):
            return f"unknown param {name!r}; params are {', '.join(PARAM_NAMES)}"
        return f"unknown field `{where}`"
    if kind in ("float_type", "float_parsing"):
        return f"{where} must be a number, got {value!r}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{where} must be an integer, got {value!r}"
    if kind in ("bool_type", "bool_parsing"):
        return f"{where} must be true or false, got {value!r}"
    if kind == "string_type":
        return f"{where} must be a string, got {value!r}"
    if kind == "list_type":
        return f"{where} must be a list, got {value!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{where} must be an object, got {value!r}"
    if kind == "literal_error":
        return f"{where} must be {ctx.get('expected', 'one of the allowed values')}, got {value!r}"
    if kind == "too_short":
        return f"{where} must not be empty"
    if kind == "string_too_short":
        return f"{where} must not be empty"
    if kind == "value_error":
        return f"{where}: {error['msg'].removeprefix('Value error, ')}"
    return f"{where}: {error['msg']}"


def _num(value: Any) -> str:
    """2.0 → 2, 0.01 → 0.01, 9223372036854775807 → 2^63-1."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value == 2**63 - 1:
        return "2^63-1"
    return str(value)

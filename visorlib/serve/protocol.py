"""The OpenAI chat-completions request, checked field by field, and the error every failure becomes.

A request body is read into a :class:`ChatRequest` here, before it reaches the model: every field
is checked for its type and range, unknown fields are refused, and each problem is an
:class:`APIError` whose ``param`` names the offending field (``messages[0].content[1].image_url``),
answered as OpenAI answers (``{"error": {"message", "type", "param", "code"}}``). The checks are
by hand rather than through a pydantic model so the message says what a user wrote wrong in the
words of the protocol, and so an unknown field is an error, never silently ignored.

VISOR adds two body fields (the ``extra_body`` of the ``openai`` client): ``sa_layers`` (one
configuration in visorlib's ``sa_layers`` grammar — ``"1,3"``, ``"none"``, ``"router"``,
``"default"`` — or a list of layers) and ``token_reduction`` (a spec as ``visorlib eval`` takes it).
``ignore_eos`` (vLLM's name) generates exactly ``max_tokens`` tokens: what benchmarks need to
compare equal amounts of work.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

# Fields a request may carry; anything else is refused (a typo must not pass unnoticed).
KNOWN_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
    "stream", "stream_options", "sa_layers", "token_reduction", "user", "ignore_eos",
    # Accepted only at the value that changes nothing: harnesses (lmms-eval) send them by default.
    "presence_penalty", "frequency_penalty", "logprobs", "response_format",
}
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}
ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4  # OpenAI's limit


class APIError(Exception):
    """A request that cannot be served, with the HTTP status and the OpenAI error body.

    Args:
        message: What is wrong, for a person.
        param: The body field at fault (dotted / indexed path), or None.
        status: HTTP status (400 bad input, 401, 404, 413, 429, 503, 500).
        code: OpenAI's machine-readable code (``context_length_exceeded``, ...), or None.
        headers: Extra response headers (``Retry-After`` for 429).
    """

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ImageRef:
    """One image part: where its bytes come from and the field that named it (for errors)."""

    url: str
    param: str


@dataclass
class ChatRequest:
    """A checked chat-completions request.

    Attributes:
        messages: The conversation in the processor's form (``{"role", "content": [parts]}``,
            image parts as ``{"type": "image"}``), images in placeholder order in ``images``.
        images: Where each image comes from.
        max_tokens: Upper bound on generated tokens; None: the server's default.
        temperature: 0 (or None) is greedy decoding; above 0 samples.
        top_p: Nucleus mass when sampling.
        seed: Seed of the request's own sampling generator (None: random).
        stop: Strings that end the answer (not included in it).
        stream: Answer with server-sent events.
        include_usage: With ``stream``, send a last chunk carrying ``usage``.
        sa_layers: The body's ``sa_layers`` as written (parsed against the model's plan later).
        token_reduction: The body's ``token_reduction`` as written (None: the card's).
        ignore_eos: Keep generating past end-of-sequence tokens, up to ``max_tokens``.
    """

    messages: list[dict[str, Any]]
    images: list[ImageRef] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    sa_layers: Any = None
    token_reduction: Any = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return not self.temperature


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if _is_number(value) else type(value).__name__)


def _need(ok: bool, param: str, expected: str, value: Any) -> None:
    if not ok:
        raise APIError(f"'{param}' must be {expected}, got {_type_name(value)} {value!r:.80}", param)


def parse_chat_request(body: Any, served_name: str, placeholders: tuple[str, ...] = ()) -> ChatRequest:
    """Check a decoded JSON body and return the request it describes.

    Args:
        body: The decoded JSON.
        served_name: The model name this server answers to (``model`` must equal it).
        placeholders: Strings a text part may not contain (the processor's image / video
            placeholders and the routing marker): written in text they would add visual slots
            with no image behind them, or move the router's token.

    Raises:
        APIError: Naming the first field that is wrong.
    """
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {_type_name(body)}", None)
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise APIError(f"unknown field '{unknown[0]}' (this server accepts: {', '.join(sorted(KNOWN_FIELDS))})",
                       unknown[0])
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in (None, neutral):
            raise APIError(f"'{name}' is not supported by this server (only {neutral!r})", name)
    if body.get("response_format") not in (None, {"type": "text"}):
        raise APIError("'response_format' is not supported by this server (only {\"type\": \"text\"})", "response_format")
    if "user" in body:
        _need(isinstance(body["user"], str), "user", "a string", body["user"])
    model = body.get("model")
    _need(isinstance(model, str), "model", "a string", model)
    if model != served_name:
        raise APIError(f"model '{model}' is not served here; this server serves '{served_name}'", "model", 404,
                       "model_not_found")
    messages, images = _parse_messages(body.get("messages"), placeholders)
    request = ChatRequest(messages=messages, images=images)
    if body.get("n") is not None:
        _need(_is_int(body["n"]), "n", "an integer", body["n"])
        if body["n"] != 1:
            raise APIError(f"'n' must be 1 (one choice per request), got {body['n']}", "n")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None:
            _need(_is_int(value) and value >= 1, name, "an integer >= 1", value)
            request.max_tokens = int(value) if request.max_tokens is None else min(request.max_tokens, int(value))
    if body.get("temperature") is not None:
        value = body["temperature"]
        _need(_is_number(value) and 0 <= value <= 2, "temperature", "a number in [0, 2]", value)
        request.temperature = float(value)
    if body.get("top_p") is not None:
        value = body["top_p"]
        _need(_is_number(value) and 0 < value <= 1, "top_p", "a number in (0, 1]", value)
        request.top_p = float(value)
    if body.get("seed") is not None:
        _need(_is_int(body["seed"]) and 0 <= body["seed"] < 2**63, "seed", "a non-negative 64-bit integer", body["seed"])
        request.seed = int(body["seed"])
    request.stop = _parse_stop(body.get("stop"))
    if body.get("stream") is not None:
        _need(isinstance(body["stream"], bool), "stream", "a boolean", body["stream"])
        request.stream = body["stream"]
    options = body.get("stream_options")
    if options is not None:
        _need(isinstance(options, dict), "stream_options", "an object", options)
        extra = sorted(set(options) - {"include_usage"})
        if extra:
            raise APIError(f"unknown field 'stream_options.{extra[0]}'", f"stream_options.{extra[0]}")
        usage = options.get("include_usage", False)
        _need(isinstance(usage, bool), "stream_options.include_usage", "a boolean", usage)
        request.include_usage = usage
    sa = body.get("sa_layers")
    _need(sa is None or isinstance(sa, str) or (isinstance(sa, list) and all(_is_int(i) for i in sa)),
          "sa_layers", "a string such as \"1,3\", \"none\", \"router\" or \"default\", or a list of layers", sa)
    request.sa_layers = sa
    request.token_reduction = body.get("token_reduction")
    if body.get("ignore_eos") is not None:
        _need(isinstance(body["ignore_eos"], bool), "ignore_eos", "a boolean", body["ignore_eos"])
        request.ignore_eos = body["ignore_eos"]
    return request


def _parse_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    _need(isinstance(items, list) and all(isinstance(s, str) for s in items), "stop", "a string or an array of strings",
          stop)
    if len(items) > MAX_STOP:
        raise APIError(f"'stop' holds {len(items)} strings; at most {MAX_STOP}", "stop")
    if any(s == "" for s in items):
        raise APIError("'stop' strings must not be empty", "stop")
    return list(items)


def _parse_messages(messages: Any, placeholders: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """OpenAI messages -> the processor's messages (image parts without their data) and the image references."""
    _need(isinstance(messages, list) and len(messages) > 0, "messages", "a non-empty array", messages)
    out, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        _need(isinstance(message, dict), where, "an object", message)
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise APIError(f"unknown field '{where}.{extra[0]}'", f"{where}.{extra[0]}")
        role = message.get("role")
        if role not in ROLES:
            raise APIError(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r:.40}", f"{where}.role")
        content = message.get("content")
        parts: list[dict[str, Any]] = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": _text(content, f"{where}.content", placeholders)})
        else:
            _need(isinstance(content, list), f"{where}.content", "a string or an array of parts", content)
            for j, part in enumerate(content):
                parts.append(_parse_part(part, f"{where}.content[{j}]", role, images, placeholders))
        # "developer" is the newer name of the system role; the chat templates know "system".
        out.append({"role": "system" if role == "developer" else role, "content": parts})
    return out, images


def _parse_part(part: Any, where: str, role: str, images: list[ImageRef], placeholders: tuple[str, ...]) -> dict:
    _need(isinstance(part, dict), where, "an object", part)
    part_type = part.get("type")
    if part_type == "text":
        extra = sorted(set(part) - {"type", "text"})
        if extra:
            raise APIError(f"unknown field '{where}.{extra[0]}'", f"{where}.{extra[0]}")
        return {"type": "text", "text": _text(part.get("text"), f"{where}.text", placeholders)}
    if part_type == "image_url":
        extra = sorted(set(part) - {"type", "image_url"})
        if extra:
            raise APIError(f"unknown field '{where}.{extra[0]}'", f"{where}.{extra[0]}")
        if role != "user":
            raise APIError(f"'{where}': images are accepted in user messages only", where)
        spec = part.get("image_url")
        spec = {"url": spec} if isinstance(spec, str) else spec
        _need(isinstance(spec, dict), f"{where}.image_url", "an object with a 'url'", spec)
        extra = sorted(set(spec) - {"url", "detail"})
        if extra:
            raise APIError(f"unknown field '{where}.image_url.{extra[0]}'", f"{where}.image_url.{extra[0]}")
        url = spec.get("url")
        _need(isinstance(url, str) and url != "", f"{where}.image_url.url", "a non-empty string", url)
        images.append(ImageRef(url, f"{where}.image_url.url"))
        return {"type": "image"}
    raise APIError(f"'{where}.type' must be 'text' or 'image_url', got {part_type!r:.40}", f"{where}.type")


def _text(text: Any, where: str, placeholders: tuple[str, ...]) -> str:
    _need(isinstance(text, str), where, "a string", text)
    for marker in placeholders:
        if marker in text:
            raise APIError(f"'{where}' contains {marker!r}, which this model reserves for its images / router; "
                           "send images as image_url parts", where)
    return text

"""Reading a request body within bounds: its size (413), its JSON nesting (400) and its
numbers (finite only, 422), before any of it reaches the request model."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from cloudburst.config import StorageConfig
from cloudburst.serving.settings import ApiError

MAX_JSON_DEPTH = 16  # an ensemble request nests 4 deep (body, scenario, condition, list)


class NonFiniteNumber(ValueError):
    """A NaN or infinite number in the body."""


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 once its declared or actual size passes ``limit`` bytes."""

    def too_big(size: str) -> ApiError:
        return ApiError(
            413,
            f"the request body is {size} bytes; this server takes at most {limit} "
            "(max_body_bytes): send a smaller request",
        )

    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise ApiError(400, "the Content-Length header is not a number") from None
        if length > limit:
            raise too_big(str(length))
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big(f"more than {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def nesting(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in the JSON text ``raw``."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _constant(name: str) -> float:
    raise NonFiniteNumber(name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NonFiniteNumber(text)
    return value


def parse_json(raw: bytes) -> Any:
    """``raw`` as JSON: 400 when not JSON or nested too deep, 422 for NaN or infinities."""
    depth = nesting(raw)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(
            400,
            f"the body nests JSON {depth} levels deep; an ensemble request needs at most "
            f"{MAX_JSON_DEPTH}",
        )
    try:
        return json.loads(raw, parse_constant=_constant, parse_float=_finite)
    except NonFiniteNumber as exc:
        raise ApiError(
            422,
            f"the body holds the non-finite number {exc}; every number must be finite "
            "(no NaN, Infinity or overflowing exponents)",
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "the body is not valid JSON") from None


def without_storage(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` without an empty ``storage`` section (a client's default asks for nothing);
    400 when it asks for storage settings of its own: the server reaches object storage with
    its settings for each prefix only."""
    if body.get("storage") not in (None, {}, StorageConfig().model_dump()):
        raise ApiError(
            400,
            "storage: this server reaches object storage with its own settings for "
            "each allowed prefix; remove storage from the request (operators set it "
            "per prefix in allowed_prefixes and data_prefixes)",
        )
    return body


def validation_message(exc: ValidationError) -> str:
    """A request model's refusal: each field's path and what was wrong with it."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())

"""An engine's error answer in OpenAI's shape, for the clients of a business service.

Why. OpenAI SDKs (and LiteLLM) show `error.message` of a `{"error": {"message", "type", "param", "code"}}` body and
nothing else: `transformers serve` answers FastAPI's `{"detail": …}`, another engine plain text, and a newcomer's
openai SDK printed only "Error code: 400" while the engine had said why. Engines also name their model by where it
lies on disk ("Server is pinned to '/home/…/tiny-model'"): a client of a business service should read the tag it
asked for, never a path of the serving machine. Both data planes apply this (the Lua code mirrors it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

# An error's OpenAI `type` by status (vLLM and OpenAI use these names).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
               504: "timeout_error"}
ERROR_BODY_MAX_BYTES = 64 * 1024  # an error body longer than this passes through unchanged
MESSAGE_MAX_CHARS = 2_000
# A quoted absolute path ('…', "…" or `…`): what an engine calls its model. Quoted only: an unquoted "/v1/…" in a
# message is a URL path, not a file.
_QUOTED_PATH = re.compile(r"""(['"`])(/[^'"`\n]*)\1""")


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def _detail(detail: Any) -> str:
    """FastAPI's `detail`: a text, or pydantic's list of errors (`loc`, `msg`)."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, Mapping):
                where = ".".join(str(x) for x in item.get("loc", ()) if x != "body")
                parts.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg", "")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return json.dumps(detail)


def scrub_paths(message: str, tag: str) -> str:
    """The model's name on disk replaced by the tag the client asked for."""
    return _QUOTED_PATH.sub(lambda m: f"{m[1]}{tag}{m[1]}", message)


def openai_error(status: int, body: bytes, tag: str) -> dict[str, Any]:
    """The error body a client of a business service gets for an engine's error answer (`status` ≥ 400): the
    engine's reason kept, in OpenAI's shape, with no local path."""
    text = body.decode("utf-8", errors="replace")
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    kind, param, code = error_type(status), None, status
    inner = payload.get("error") if isinstance(payload, Mapping) else None
    if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):  # OpenAI's (vLLM's, SGLang's) shape
        message = inner["message"]
        kind = inner["type"] if isinstance(inner.get("type"), str) else kind
        param = inner["param"] if isinstance(inner.get("param"), str) else None
        code = inner["code"] if isinstance(inner.get("code"), (int, str)) and not isinstance(inner.get("code"), bool) else status
    elif isinstance(payload, Mapping) and "detail" in payload:  # FastAPI's (transformers serve)
        message = _detail(payload["detail"])
    elif isinstance(payload, Mapping) and isinstance(payload.get("message"), str):  # vLLM's older top-level shape
        message = payload["message"]
        param = payload["param"] if isinstance(payload.get("param"), str) else None
    elif isinstance(payload, Mapping) and isinstance(inner, str):
        message = inner
    else:
        message = text.strip() or f"the engine answered {status} without a reason"
    message = scrub_paths(message, tag)[:MESSAGE_MAX_CHARS]
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

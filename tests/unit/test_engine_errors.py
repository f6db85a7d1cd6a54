"""Engine errors in OpenAI's shape, with the engine's reason and never a local path (issue 30, item 1)."""

from __future__ import annotations

import json

import pytest

from corral.domain.engine_errors import openai_error


@pytest.mark.parametrize(("status", "body", "message", "kind"), [
    (400, b'{"detail": "Cannot apply chat template to an empty conversation"}',
     "Cannot apply chat template to an empty conversation", "invalid_request_error"),
    (422, json.dumps({"detail": [{"loc": ["body", "temperature"], "msg": "could not convert string to float: 'hot'"}]}).encode(),
     "temperature: could not convert string to float: 'hot'", "invalid_request_error"),
    (404, b"""{"detail": "Server is pinned to '/home/me/models/tiny-model'; requested 'no-such-model'"}""",
     "Server is pinned to 'tiny'; requested 'no-such-model'", "not_found_error"),
    (500, b"boom: the engine fell over", "boom: the engine fell over", "server_error"),
    (500, b"", "the engine answered 500 without a reason", "server_error"),
    (404, b'{"error": {"message": "The model `/models/x` does not exist.", "type": "NotFoundError", "param": "model", '
          b'"code": 404}}', "The model `tiny` does not exist.", "NotFoundError"),
    (400, b'{"object": "error", "message": "max_tokens must be at least 1", "type": "BadRequestError", "param": null}',
     "max_tokens must be at least 1", "invalid_request_error"),
])
def test_an_engine_error_reaches_clients_in_openai_shape(status: int, body: bytes, message: str, kind: str) -> None:
    error = openai_error(status, body, "tiny")["error"]
    assert error["message"] == message and error["type"] == kind
    assert set(error) == {"message", "type", "param", "code"}


def test_urls_are_not_taken_for_paths_and_messages_are_bounded() -> None:
    assert openai_error(400, b'{"detail": "POST /v1/chat/completions needs messages"}', "t")["error"]["message"] == (
        "POST /v1/chat/completions needs messages")
    assert len(openai_error(400, b"x" * 10_000, "t")["error"]["message"]) == 2_000

"""Corral's inference SIMULATOR: an OpenAI-compatible server that runs no model.

It answers `/v1/chat/completions` and `/v1/completions` (streaming or not) with generated words,
after a configurable time-to-first-token and at a configurable tokens/s, like llm-d's inference
simulator. It exists for routing tests and benchmarks; every reply says it is simulated
(`system_fingerprint: "corral-simulator:<replica>"`, header `x-simulator-replica`).

    python -m corral.engines.simulator --model qwen-06b --port 9001 --ttft-ms 20 --tokens-per-second 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


def build_app(model: str, ttft_s: float, tokens_per_second: float, default_max_tokens: int, startup_s: float,
              api_key: str | None = None) -> Starlette:
    replica = os.environ.get("CORRAL_REPLICA_NAME", "simulator")
    fingerprint = f"corral-simulator:{replica}"
    headers = {"x-simulator-replica": replica}
    ready_at = time.monotonic() + startup_s
    inter_token_s = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0

    async def health(_: Request) -> JSONResponse:
        if time.monotonic() < ready_at:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "simulator": True, "replica": replica})

    def refused(request: Request) -> JSONResponse | None:
        """Like vLLM with --api-key: /v1 paths need `Authorization: Bearer <key>`; /health stays open."""
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return None

    async def models(request: Request) -> JSONResponse:
        if (refusal := refused(request)) is not None:
            return refusal
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "corral-simulator"}]})

    async def complete(request: Request) -> JSONResponse | StreamingResponse:
        if (refusal := refused(request)) is not None:
            return refusal
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return JSONResponse({"error": "request body must be JSON"}, status_code=400)
        chat = request.url.path.endswith("/chat/completions")
        n_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or default_max_tokens)
        words = [f"tok{i}" for i in range(max(n_tokens, 0))]
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        if not body.get("stream"):
            await asyncio.sleep(ttft_s + inter_token_s * max(len(words) - 1, 0))
            text = " ".join(words)
            choice = {"index": 0, "finish_reason": "length"}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            return JSONResponse(
                {
                    "id": request_id, "object": obj, "created": created, "model": model,
                    "system_fingerprint": fingerprint, "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": 1 + len(words)},
                },
                headers=headers,
            )

        async def events():
            await asyncio.sleep(ttft_s)
            for i, word in enumerate(words):
                if i:
                    await asyncio.sleep(inter_token_s)
                piece = word if i == 0 else " " + word
                delta = {"delta": {"content": piece}} if chat else {"text": piece}
                chunk = {
                    "id": request_id, "object": obj + ".chunk" if chat else obj, "created": created, "model": model,
                    "system_fingerprint": fingerprint, "choices": [{"index": 0, "finish_reason": None, **delta}],
                }
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", complete, methods=["POST"]),
            Route("/v1/completions", complete, methods=["POST"]),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="corral-simulator", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="time to first token")
    parser.add_argument("--tokens-per-second", type=float, default=200.0)
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens when the request sets none")
    parser.add_argument("--startup-s", type=float, default=0.0, help="time /health answers 503 (model loading)")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 (default: $SIMULATOR_API_KEY)")
    args = parser.parse_args(argv)

    import uvicorn

    app = build_app(args.model, args.ttft_ms / 1000, args.tokens_per_second, args.max_tokens, args.startup_s,
                    api_key=args.api_key or os.environ.get("SIMULATOR_API_KEY") or None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()

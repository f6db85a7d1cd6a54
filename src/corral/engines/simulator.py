"""Corral's inference SIMULATOR: an OpenAI-compatible server that runs no model.

It answers `/v1/chat/completions` and `/v1/completions` (streaming or not) with generated words and
behaves like an engine under load: `--max-num-seqs` batch slots with a FIFO queue behind them, time to
first token = queue wait + a fixed part + prefill time proportional to the prompt's (uncached) tokens,
time per output token growing with the number of running sequences, an optional prefix cache, and
`/metrics` in vLLM's metric names. The formulas and their published sources are in
`corral.engines.sim_model`. It answers like vLLM where a client can tell: an unknown `model` is a 404
in vLLM's error shape, the last streamed chunk carries `finish_reason`,
`stream_options.include_usage` adds a usage chunk, and non-streamed answers carry usage.

It exists for routing tests, benchmarks and the autopilot; every reply says it is simulated
(`system_fingerprint: "corral-simulator:<replica>"`, header `x-simulator-replica`).

    python -m corral.engines.simulator --model qwen-06b --port 9001 --ttft-ms 20 --tokens-per-second 200 \\
        --max-num-seqs 8 --enable-prefix-caching
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from corral.domain.sleep import OFFLOAD_BANDWIDTH_GBPS, RELOAD_BANDWIDTH_GBPS, SleepLevel, SleepTiming
from corral.engines.sim_model import (
    E2E_BUCKETS,
    ITL_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
    PrefixCache,
    Prompt,
    SlotQueue,
    TimingModel,
    block_hashes,
    chat_prompt,
    completion_prompt,
    prompt_tokens,
    render_counter,
    render_gauge,
    render_histogram,
    request_problem,
)
from corral.engines.sim_sleep import SimSleep

# Sleeping is coarse (an event-loop wake-up costs tens of µs): tokens due within this much are sent at
# once, and the schedule is absolute, so short sleeps neither pile up nor drift.
_SLEEP_GRANULARITY_S = 0.001


def error(message: str, status: int, err_type: str, param: str | None = None) -> JSONResponse:
    """vLLM's error body (`ErrorResponse` with its `error` object), which OpenAI SDKs read."""
    return JSONResponse({"error": {"message": message, "type": err_type, "param": param, "code": status}}, status_code=status)


@dataclass(frozen=True)
class Work:
    """One admitted request's size."""

    prompt: Prompt
    prompt_tokens: int
    output_tokens: int


class SimEngine:
    """The simulator's engine state: batch slots, the prefix cache and the metrics. One per process."""

    def __init__(self, model: str, timing: TimingModel, prefix_caching: bool) -> None:
        self.model_name = model
        self.timing = timing
        self.slots = SlotQueue(timing.max_num_seqs)
        self.cache = PrefixCache(timing.num_gpu_blocks, timing.block_size) if prefix_caching else None
        self._admissions: dict[int, asyncio.Future[None]] = {}
        self._tokens: dict[int, int] = {}  # running request → its tokens so far (KV-cache usage)
        self._ids = itertools.count()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    async def run(self, work: Work) -> AsyncIterator[int]:
        """Yield the index of each output token when it is due: wait for a slot, prefill, decode."""
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        rid = next(self._ids)
        if not self.slots.submit(rid):
            admitted = self._admissions[rid] = loop.create_future()
            try:
                await admitted
            except asyncio.CancelledError:  # the client left while waiting (or just after admission)
                self._release(rid)
                raise
            finally:
                self._admissions.pop(rid, None)
        try:
            self._tokens[rid] = work.prompt_tokens
            hashes = block_hashes(work.prompt, self.timing.block_size) if self.cache is not None else []
            cached = self.cache.lookup(hashes, work.prompt_tokens) if self.cache is not None else 0
            due = loop.time() + self.timing.ttft_s(work.prompt_tokens, cached)
            self.prompt_tokens_total += work.prompt_tokens
            previous = None
            for i in range(work.output_tokens):
                if i:
                    due += self.timing.inter_token_s(len(self.slots.running))
                if (delay := due - loop.time()) > _SLEEP_GRANULARITY_S:
                    await asyncio.sleep(delay)
                now = loop.time()
                if i == 0:
                    self.ttft.observe(now - arrival)
                    if self.cache is not None:
                        self.cache.insert(hashes)
                else:
                    self.itl.observe(now - previous)
                previous = now
                self._tokens[rid] += 1
                self.generation_tokens_total += 1
                yield i
            self.e2e.observe(loop.time() - arrival)
        finally:
            self._release(rid)

    def _release(self, rid: int) -> None:
        self._tokens.pop(rid, None)
        for admitted in self.slots.release(rid):
            future = self._admissions.get(admitted)  # type: ignore[call-overload]
            if future is not None and not future.done():
                future.set_result(None)

    def metrics(self) -> str:
        """`/metrics` in vLLM's names and labels (model_name, engine), Prometheus text format."""
        labels = {"model_name": self.model_name, "engine": "0"}
        lines = [
            *render_gauge("vllm:num_requests_running", "Number of requests in model execution batches.", labels,
                          len(self.slots.running)),
            *render_gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels,
                          len(self.slots.waiting)),
            *render_gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels,
                          self.timing.kv_cache_usage(self._tokens.values())),
            *render_counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                            labels, self.cache.queries if self.cache else 0),
            *render_counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                            labels, self.cache.hits if self.cache else 0),
            *render_counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels, self.prompt_tokens_total),
            *render_counter("vllm:generation_tokens", "Number of generation tokens processed.", labels,
                            self.generation_tokens_total),
            *render_histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", labels,
                              self.ttft),
            *render_histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", labels,
                              self.itl),
            *render_histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", labels,
                              self.e2e),
        ]
        return "\n".join(lines) + "\n"


def build_app(model: str, timing: TimingModel | None = None, *, default_max_tokens: int = 16, startup_s: float = 0.0,
              api_key: str | None = None, prefix_caching: bool = False, log_stats_s: float = 0.0,
              sleep_mode: SleepTiming | None = None) -> Starlette:
    timing = timing or TimingModel()
    replica = os.environ.get("CORRAL_REPLICA_NAME", "simulator")
    fingerprint = f"corral-simulator:{replica}"
    headers = {"x-simulator-replica": replica}
    ready_at = time.monotonic() + startup_s
    engine = SimEngine(model, timing, prefix_caching)
    sleeper = SimSleep(sleep_mode) if sleep_mode is not None else None  # vLLM's sleep mode (engines/sim_sleep.py)

    async def health(_: Request) -> JSONResponse:
        if time.monotonic() < ready_at:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "simulator": True, "replica": replica}
                            | ({"sleeping": sleeper.is_sleeping} if sleeper is not None else {}))

    async def metrics(_: Request) -> PlainTextResponse:
        return PlainTextResponse(engine.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def refused(request: Request) -> JSONResponse | None:
        """Like vLLM with --api-key: /v1 paths need `Authorization: Bearer <key>`; /health and /metrics stay open."""
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return None

    async def models(request: Request) -> JSONResponse:
        if (refusal := refused(request)) is not None:
            return refusal
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "created": int(time.time()),
                                                         "owned_by": "corral-simulator", "max_model_len": timing.max_model_len}]})

    async def complete(request: Request) -> JSONResponse | StreamingResponse:
        if (refusal := refused(request)) is not None:
            return refusal
        if sleeper is not None and (asleep := sleeper.refusal()) is not None:
            return asleep
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error("request body must be JSON", 400, "BadRequestError")
        if not isinstance(body, dict):
            return error("request body must be a JSON object", 400, "BadRequestError")
        requested = body.get("model")
        if requested and requested != model:  # vLLM: a missing model means the served one
            return error(f"The model `{requested}` does not exist.", 404, "NotFoundError", "model")
        chat = request.url.path.endswith("/chat/completions")
        if (problem := request_problem(body, chat=chat)) is not None:
            return error(problem[0], 400, "BadRequestError", problem[1])
        limit = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None else body.get("max_tokens")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            return error(f"max_tokens must be at least 1, got {limit}.", 400, "BadRequestError", "max_tokens")
        prompt = chat_prompt(body.get("messages")) if chat else completion_prompt(body.get("prompt"))
        n_prompt = prompt_tokens(prompt)
        n_tokens = limit if limit is not None else default_max_tokens
        if n_prompt + n_tokens > timing.max_model_len:
            return error(f"This model's maximum context length is {timing.max_model_len} tokens. However, you requested "
                         f"{n_prompt + n_tokens} tokens ({n_prompt} in the messages, {n_tokens} in the completion). "
                         "Please reduce the length of the messages or completion.", 400, "BadRequestError")
        # A request that set its limit stops there ("length"); one that did not ends on its own ("stop"), as at an EOS.
        finish = "length" if limit is not None else "stop"
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        work = Work(prompt, n_prompt, n_tokens)

        def usage(completion_tokens: int) -> dict:
            return {"prompt_tokens": n_prompt, "completion_tokens": completion_tokens, "total_tokens": n_prompt + completion_tokens}

        if not body.get("stream"):
            words = [f"tok{i}" async for i in engine.run(work)]
            text = " ".join(words)
            choice = {"index": 0, "finish_reason": finish, "logprobs": None}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            return JSONResponse(
                {"id": request_id, "object": obj, "created": created, "model": model, "system_fingerprint": fingerprint,
                 "choices": [choice], "usage": usage(len(words))},
                headers=headers,
            )

        def chunk(choices: list[dict], **extra: object) -> str:
            data = {"id": request_id, "object": f"{obj}.chunk" if chat else obj, "created": created, "model": model,
                    "system_fingerprint": fingerprint, "choices": choices, **extra}
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            async for i in engine.run(work):
                piece = f"tok{i}" if i == 0 else f" tok{i}"
                delta = ({"delta": {"role": "assistant", "content": piece} if i == 0 else {"content": piece}} if chat
                         else {"text": piece})
                last = i == n_tokens - 1
                yield chunk([{"index": 0, **delta, "logprobs": None, "finish_reason": finish if last else None}])
            if include_usage:  # OpenAI's and vLLM's shape: no choices, the whole request's usage
                yield chunk([], usage=usage(n_tokens))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    tasks: list[asyncio.Task] = []

    async def log_stats() -> None:
        """vLLM's periodic line (`corral logs` on a simulator replica showed nothing but its header), while it works."""
        prompt, generation = engine.prompt_tokens_total, engine.generation_tokens_total
        while True:
            await asyncio.sleep(log_stats_s)
            now_prompt, now_generation = engine.prompt_tokens_total, engine.generation_tokens_total
            running, waiting = len(engine.slots.running), len(engine.slots.waiting)
            if (now_prompt, now_generation) != (prompt, generation) or running or waiting:
                usage = engine.timing.kv_cache_usage(engine._tokens.values())
                print(f"INFO {time.strftime('%m-%d %H:%M:%S')} [simulator] Avg prompt throughput: "
                      f"{(now_prompt - prompt) / log_stats_s:.1f} tokens/s, Avg generation throughput: "
                      f"{(now_generation - generation) / log_stats_s:.1f} tokens/s, Running: {running} reqs, "
                      f"Waiting: {waiting} reqs, GPU KV cache usage: {usage:.1%}", flush=True)
            prompt, generation = now_prompt, now_generation

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        if log_stats_s > 0:
            tasks.append(asyncio.create_task(log_stats()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/v1/models", models),
            Route("/v1/chat/completions", complete, methods=["POST"]),
            Route("/v1/completions", complete, methods=["POST"]),
            *(sleeper.routes() if sleeper is not None else []),
        ],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> None:
    defaults = TimingModel()
    parser = argparse.ArgumentParser(prog="corral-simulator", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-ms", type=float, default=defaults.ttft_base_s * 1000,
                        help="fixed part of the time to first token (scheduling, first forward pass); queue wait and prefill add to it")
    parser.add_argument("--tokens-per-second", type=float, default=defaults.decode_tokens_per_s,
                        help="decode speed of one sequence alone (0: instant)")
    parser.add_argument("--itl-growth-per-seq", type=float, default=defaults.itl_growth,
                        help="inter-token latency grows by this fraction for each other running sequence")
    parser.add_argument("--prefill-tokens-per-second", type=float, default=defaults.prefill_tokens_per_s,
                        help="prompt tokens prefilled per second (0: instant)")
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs,
                        help="batch slots: requests beyond wait in a FIFO queue (vLLM's flag)")
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len,
                        help="prompt + completion tokens allowed per request (vLLM's flag)")
    parser.add_argument("--block-size", type=int, default=defaults.block_size, help="tokens per KV-cache block (vLLM's flag)")
    parser.add_argument("--num-gpu-blocks", type=int, default=defaults.num_gpu_blocks,
                        help="KV-cache blocks: the base of vllm:kv_cache_usage_perc and the prefix cache's capacity")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=False,
                        help="an LRU cache of prompt-prefix blocks that shortens prefill on a hit (vLLM's flag)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens when the request sets none")
    parser.add_argument("--startup-s", type=float, default=0.0, help="time /health answers 503 (model loading)")
    parser.add_argument("--enable-sleep-mode", action="store_true",
                        help="vLLM's sleep mode: POST /sleep?level=1|2, POST /wake_up, GET /is_sleeping (engines/sim_sleep.py)")
    parser.add_argument("--weights-gb", type=float, default=1.0,
                        help="the model weights' size, which sets the modelled sleep and wake times")
    parser.add_argument("--sleep-bandwidth-gbps", type=float, default=OFFLOAD_BANDWIDTH_GBPS,
                        help="host<->device copy speed of a level-1 sleep and wake (GB/s)")
    parser.add_argument("--reload-bandwidth-gbps", type=float, default=RELOAD_BANDWIDTH_GBPS,
                        help="weight reload speed of a level-2 wake (GB/s, from disk)")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 (default: $SIMULATOR_API_KEY)")
    args = parser.parse_args(argv)
    try:
        timing = TimingModel(ttft_base_s=args.ttft_ms / 1000, decode_tokens_per_s=args.tokens_per_second,
                             prefill_tokens_per_s=args.prefill_tokens_per_second, itl_growth=args.itl_growth_per_seq,
                             max_num_seqs=args.max_num_seqs, block_size=args.block_size, num_gpu_blocks=args.num_gpu_blocks,
                             max_model_len=args.max_model_len)
    except ValueError as exc:
        parser.error(str(exc))
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be ≥ 1, got {args.max_tokens}")
    sleep_mode = None
    if args.enable_sleep_mode:
        try:
            sleep_mode = SleepTiming(weights_gb=args.weights_gb, offload_bandwidth_gbps=args.sleep_bandwidth_gbps,
                                     reload_bandwidth_gbps=args.reload_bandwidth_gbps)
        except ValueError as exc:
            parser.error(f"sleep mode: {exc}")

    import uvicorn

    app = build_app(args.model, timing, default_max_tokens=args.max_tokens, startup_s=args.startup_s,
                    api_key=args.api_key or os.environ.get("SIMULATOR_API_KEY") or None,
                    prefix_caching=args.enable_prefix_caching, log_stats_s=10.0, sleep_mode=sleep_mode)
    print(f"INFO [simulator] Corral's simulated engine (no model runs) serving {args.model!r} on {args.host}:{args.port}: "
          f"max-num-seqs {timing.max_num_seqs}, {args.tokens_per_second:g} tokens/s per sequence, TTFT {args.ttft_ms:g} ms, "
          f"prefix caching {'on' if args.enable_prefix_caching else 'off'}, ready in {args.startup_s:g} s"
          + (f", sleep mode on ({args.weights_gb:g} GB of weights: level-1 wake {sleep_mode.wake_s(SleepLevel.OFFLOAD):.2f} s, "
             f"level-2 wake {sleep_mode.wake_s(SleepLevel.DISCARD):.2f} s)" if sleep_mode else ""), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()

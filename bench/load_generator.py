"""A real load generator against Corral: GuideLLM (the vLLM project's) on a business service and on one replica.

    python3 -m venv .venv-bench && .venv-bench/bin/pip install guidellm torch==2.13.0   # once (~1 min)
    .venv/bin/python bench/load_generator.py [--rates 4 12 24] [--seconds 12] [--replicas 2]

GuideLLM lives in its own virtual environment (`.venv-bench`, or `--guidellm PATH`): it pins newer
transformers and pulls torch, whose CUDA build is several GB unless the local CPU wheel is pinned
beside it. `corral serve` runs a pool of simulator replicas with the engine model of
`corral.engines.sim_model` (batch slots, FIFO queue, prefill, ITL growing with the batch: what a
load generator can tell apart from an idle echo server), all assigned to one business service.
GuideLLM then sends streaming chat requests at each constant rate, for `--seconds` each, first
through the business service (the gateway spreads them over the replicas), then straight to one
replica. Prompts are GuideLLM's synthetic text, sized with the tiny model's tokenizer built here
(no model hub); the simulator counts ~4 characters a token, so its token counts differ from the
tokenizer's. The table reads GuideLLM's own JSON report; `--keep DIR` keeps the reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import Corral
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
TAG = "bench"
# The simulator's documented defaults (sim_model.TimingModel), spelt out so that the table says what it measured.
ENGINE_ARGS = "--max-num-seqs 8 --ttft-ms 20 --tokens-per-second 200 --itl-growth-per-seq 0.03 --prefill-tokens-per-second 10000"


def guidellm_report(guidellm: str, target: str, tokenizer: Path, rate: float, seconds: float, prompt_tokens: int,
                    output_tokens: int, report: Path) -> dict:
    """One GuideLLM run at a constant rate; its JSON report (written to `report`)'s first benchmark."""
    # GuideLLM checks `{target}/health` first; a business service answers only the OpenAI API (/v1/...), so
    # that check is off (a failed request still counts as an error in the report).
    argv = [guidellm, "run", "--backend", f"kind=openai_http,target={target},model={TAG},validate_backend=false",
            "--profile", f"kind=constant,rate={rate:g}", "--constraint", f"kind=max_duration,seconds={seconds:g}",
            "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
            "--tokenizer", f"kind=hf_auto,model={tokenizer}", "--output", f"kind=json,path={report}",
            "--disable-progress", "--disable-console"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0 or not report.exists():
        raise RuntimeError(f"guidellm failed ({done.returncode}): {(done.stdout + done.stderr)[-3000:]}")
    return json.loads(report.read_text())["benchmarks"][0]


def row(benchmark: dict) -> dict[str, float]:
    metrics = benchmark["metrics"]

    def pct(name: str, p: str) -> float:
        return metrics[name]["successful"]["percentiles"][p]

    totals = metrics["request_totals"]
    duration = benchmark["duration"] or 1.0
    # "cut": still running when the run's time was up (GuideLLM cancels them), not failures.
    return {"ok": totals["successful"], "errors": totals["errored"], "cut": totals.get("incomplete", 0),
            "req/s": totals["successful"] / duration,
            "out tok/s": metrics["output_tokens_per_second"]["successful"]["mean"],
            "TTFT p50": pct("time_to_first_token_ms", "p50"), "TTFT p99": pct("time_to_first_token_ms", "p99"),
            "ITL p50": pct("inter_token_latency_ms", "p50"), "ITL p99": pct("inter_token_latency_ms", "p99"),
            "concurrency": metrics["request_concurrency"]["successful"]["mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[4, 12, 24], help="requests per second, one run each")
    parser.add_argument("--seconds", type=float, default=12, help="length of each run")
    parser.add_argument("--replicas", type=int, default=2, help="simulator replicas behind the business service")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--data-plane", default="python", choices=["python", "nginx"])
    parser.add_argument("--guidellm", default=str(REPO / ".venv-bench" / "bin" / "guidellm"))
    parser.add_argument("--keep", type=Path, default=None, help="keep GuideLLM's JSON reports in this folder")
    args = parser.parse_args()
    if not Path(args.guidellm).exists() and not shutil.which(args.guidellm):
        raise SystemExit(f"{args.guidellm} not found: python3 -m venv .venv-bench && .venv-bench/bin/pip install guidellm torch==2.13.0")

    # A tokenizer for GuideLLM's synthetic prompts, without a hub.
    from corral.devtools import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="corral-loadgen-"))
    out = args.keep or work
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=160)
    results: list[tuple[str, float, dict[str, float]]] = []
    corral = Corral(data_plane=args.data_plane)
    try:
        tokenizer = build_tiny_model(work / "tiny")
        pool = corral.pool(TAG, args.replicas, ENGINE_ARGS)
        corral.api("POST", "/api/deploy-service", json={"serviceName": TAG, "modelPool": pool, "businessTag": TAG})
        corral.api("POST", "/api/distribute-pods", json={"deploymentName": pool, "counts": {TAG: args.replicas}})
        targets = {f"service ({args.replicas} replicas, {args.data_plane})": f"{corral.gateway}/s/{TAG}-nlb",
                   "1 replica, direct": corral.pods(pool)[0]["endpoint"]}
        for i, (name, target) in enumerate(targets.items()):
            for rate in args.rates:
                console.print(f"[dim]{name}: {rate:g} req/s for {args.seconds:g} s…[/dim]")
                report = guidellm_report(args.guidellm, target, tokenizer, rate, args.seconds, args.prompt_tokens,
                                         args.output_tokens, out / f"guidellm-{'service' if i == 0 else 'replica'}-{rate:g}.json")
                results.append((name, rate, row(report)))
    finally:
        corral.close()
        shutil.rmtree(work, ignore_errors=True)

    version = subprocess.run([args.guidellm, "--version"], capture_output=True, text=True).stdout.split()[-1]
    console.print(f"GuideLLM {version}, streaming chat, {args.prompt_tokens}-token prompts (its tokenizer's count), "
                  f"{args.output_tokens} output tokens, {args.seconds:g} s per rate; simulator: {ENGINE_ARGS}")
    table = Table(title="GuideLLM against a business service and one replica (ms; req/s and tokens/s achieved)")
    columns = ["req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "concurrency", "ok", "errors", "cut"]
    for column in ["target", "rate", *columns]:
        table.add_column(column, justify="right")
    for name, rate, cells in results:
        table.add_row(name, f"{rate:g}", *(f"{cells[c]:.0f}" if c in ("ok", "errors", "cut") else f"{cells[c]:.1f}" for c in columns))
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())

"""The engines Corral knows. vLLM and SGLang are for GPU machines; `transformers serve` runs on CPU;
the simulator is Corral's own OpenAI-compatible server for routing tests and benchmarks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from corral.domain.adapters import lora_module_names
from corral.domain.sleep import SleepLevel
from corral.engines.base import Engine, HttpCall, LaunchSpec, SleepSupport, register


def _has_flag(extra: list[str], *flags: str) -> bool:
    return any(arg == f or arg.startswith(f + "=") for arg in extra for f in flags)


CPU_KV_CACHE_BYTES = 1024**3  # vLLM on the CPU (no GPU given): each replica's KV cache

# vLLM's sleep mode (`--enable-sleep-mode`): its endpoints exist only with VLLM_SERVER_DEV_MODE=1, which Corral sets
# for such a replica (they are reachable on the replica's own loopback port only; the gateway never forwards them).
# The simulator answers the same calls (corral.engines.simulator).
VLLM_SLEEP_FLAG = "--enable-sleep-mode"
VLLM_SLEEP = SleepSupport(
    levels=frozenset(SleepLevel), sleep_path="/sleep", level_param="level", wake_path="/wake_up",
    state=HttpCall("GET", "/is_sleeping"),
    reload_weights=HttpCall("POST", "/collective_rpc", json={"method": "reload_weights"}),
)
# SGLang's memory saver (`--enable-memory-saver`) releases and resumes GPU memory; with `--enable-weights-cpu-backup`
# the weights are kept in host memory (level 1). Without the backup they are lost and resuming would need a weight
# update Corral does not drive, so Corral offers SGLang level 1 only. SGLang has no "is it sleeping" endpoint:
# Corral trusts its own record for it.
SGLANG_SLEEP_FLAGS = ("--enable-memory-saver", "--enable-weights-cpu-backup")
SGLANG_SLEEP = SleepSupport(levels=frozenset({SleepLevel.OFFLOAD}), sleep_path="/release_memory_occupation",
                            wake_path="/resume_memory_occupation", body={})


@dataclass(frozen=True)
class VllmEngine(Engine):
    def server_args(self, *, model_id, model_tag, port, host, gpus, extra):
        # A finetuned adapter deployed under the pool's tag answers to the tag (vLLM would otherwise give a request
        # for it to the base model, which is matched first); the base model then answers to `<tag>-base`.
        served = f"{model_tag}-base" if model_tag in lora_module_names(extra) else model_tag
        args = ["--model", model_id, "--served-model-name", served, "--host", host, "--port", str(port)]
        if gpus > 1 and not _has_flag(extra, "--tensor-parallel-size", "-tp"):
            args += ["--tensor-parallel-size", str(gpus)]
        if gpus == 0 and not _has_flag(extra, "--kv-cache-memory-bytes", "--gpu-memory-utilization"):
            # vLLM's CPU build reserves 90% of the machine's memory by default (`--gpu-memory-utilization` means host
            # memory there), so a second replica could not start: a fixed KV cache instead, settable in engineArgs.
            args += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
        return args + extra

    def launch(self, *, model_id, model_tag, port, host, gpus, extra, replica):
        spec = super().launch(
            model_id=model_id, model_tag=model_tag, port=port, host=host, gpus=gpus, extra=extra, replica=replica
        )
        env = dict(spec.env)
        if Path(model_id).is_dir():
            env["HF_HUB_OFFLINE"] = "1"  # a local directory needs no hub; offline fails fast instead of hanging
        if _has_flag(extra, "--enable-lora"):
            # Adapters are added to a running pool (corral.adapters) through /v1/load_lora_adapter, which vLLM
            # serves only with this set.
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if _has_flag(extra, VLLM_SLEEP_FLAG):
            env["VLLM_SERVER_DEV_MODE"] = "1"  # /sleep, /wake_up, /is_sleeping exist only in dev mode
        return LaunchSpec(argv=spec.argv, env=env)

    def sleep_support(self, extra):
        return VLLM_SLEEP if _has_flag(extra, VLLM_SLEEP_FLAG) else None

    def sleep_refusal(self, extra):
        return f"engine '{self.name}' sleeps only when started with {VLLM_SLEEP_FLAG} in engineArgs"


@dataclass(frozen=True)
class SglangEngine(Engine):
    def server_args(self, *, model_id, model_tag, port, host, gpus, extra):
        args = ["--model-path", model_id, "--served-model-name", model_tag, "--host", host, "--port", str(port)]
        if gpus > 1 and not _has_flag(extra, "--tp", "--tp-size"):
            args += ["--tp", str(gpus)]
        return args + extra

    def sleep_support(self, extra):
        return SGLANG_SLEEP if all(_has_flag(extra, flag) for flag in SGLANG_SLEEP_FLAGS) else None

    def sleep_refusal(self, extra):
        return f"engine '{self.name}' sleeps only when started with {' and '.join(SGLANG_SLEEP_FLAGS)} in engineArgs"


@dataclass(frozen=True)
class TransformersEngine(Engine):
    def server_args(self, *, model_id, model_tag, port, host, gpus, extra):
        device = [] if _has_flag(extra, "--device") else ["--device", "cuda" if gpus else "cpu"]
        return ["serve", model_id, *device, "--host", host, "--port", str(port), *extra]

    def launch(self, *, model_id, model_tag, port, host, gpus, extra, replica):
        spec = super().launch(
            model_id=model_id, model_tag=model_tag, port=port, host=host, gpus=gpus, extra=extra, replica=replica
        )
        env = dict(spec.env)
        if Path(model_id).exists():
            # A local directory needs no hub; offline mode makes any hub lookup fail fast instead of hang.
            env["HF_HUB_OFFLINE"] = "1"
        # `transformers serve` answers /v1/models by scanning the hub cache, which must exist.
        cache = os.environ.get("HF_HUB_CACHE") or str(Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
        Path(cache).mkdir(parents=True, exist_ok=True)
        return LaunchSpec(argv=spec.argv, env=env)


@dataclass(frozen=True)
class SimulatorEngine(Engine):
    def server_args(self, *, model_id, model_tag, port, host, gpus, extra):
        return ["--model", model_tag, "--host", host, "--port", str(port), *extra]

    def sleep_support(self, extra):
        return VLLM_SLEEP if _has_flag(extra, VLLM_SLEEP_FLAG) else None  # vLLM's endpoints and answers

    def sleep_refusal(self, extra):
        return f"engine '{self.name}' sleeps only when started with {VLLM_SLEEP_FLAG} in engineArgs"


# What each engine's command line gets from Corral (see `server_args`); engineArgs may not set these.
HOST = "the address the replica listens on (127.0.0.1 locally, the pod's interfaces in a cluster)"
PORT = "the port the replica listens on (chosen by Corral; its health checks and the gateway use it)"
MODEL = "the model it serves (from modelId)"
SERVED_NAME = "the model name it answers to (from modelTag)"

register(VllmEngine("vllm", module="vllm.entrypoints.openai.api_server", needs_gpu=True, description="vLLM",
                    reserved_flags={"--host": HOST, "--port": PORT, "--model": MODEL, "--served-model-name": SERVED_NAME}))
register(SglangEngine("sglang", module="sglang.launch_server", needs_gpu=True, description="SGLang",
                      reserved_flags={"--host": HOST, "--port": PORT, "--model-path": MODEL, "--model": MODEL,
                                      "--served-model-name": SERVED_NAME}))
register(TransformersEngine("transformers", module=None, executable="transformers", description="transformers serve (CPU-capable)",
                            serves_tag=False,  # pinned to its model path: the gateway maps the tag (routing.py)
                            reserved_flags={"--host": HOST, "--port": PORT}))
register(
    SimulatorEngine(
        "simulator",
        module="corral.engines.simulator",
        is_simulator=True,
        description="Corral's simulator: OpenAI-compatible, batch slots, queue, prefill and decode timing, vLLM's /metrics; no model is run",
        reserved_flags={"--host": HOST, "--port": PORT, "--model": SERVED_NAME},
    )
)

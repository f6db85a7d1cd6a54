"""A finetune submit or preview request checked against this machine: the dataset file (confined to the dataset
roots, read and validated), the base model (a directory here or a hub id), the trainer's packages, the GPUs and
their memory (the estimate against the largest GPU). The checks of the request's values alone are pure
(`corral.domain.finetune_request`, `corral.domain.hyperparameters`); they run here in the order a request is read,
so a request with several problems is refused for its first one. A refusal (InvalidInput: 400) creates nothing."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.aio import within
from corral.config import Settings
from corral.domain import finetune_request as request_rules
from corral.domain import hyperparameters as hyperparameter_rules
from corral.domain import labels as L
from corral.domain.errors import InvalidInput
from corral.domain.finetune_request import check_path_text, short
from corral.domain.hyperparameters import DEFAULTS
from corral.domain.memory import GIB, MemoryEstimate, ModelSpec, submit_setup, training_memory
from corral.finetune.checks import chat_template_problem
from corral.finetune.dataset import read_sources
from corral.finetune.formats import parse
from corral.finetune.preference import parse_preference
from corral.finetune.runners import ProcessRunner, TrainerRunner
from corral.gpus.inventory import GpuInventory
from corral.model_files import HUB_ID, size_model, size_model_or_none
from corral.paths import confine_dataset
from corral.views import PreviewResult

# What the trainer imports (importable names; `corral[train]` installs the first three).
TRAINER_PACKAGES = ("torch", "transformers", "peft")
PREFERENCE_PACKAGES = ("trl", "datasets")  # dpo and orpo: TRL's trainers (`corral[train]` installs them)
QLORA_PACKAGES = ("bitsandbytes",)
PREVIEW_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Submission:
    """A submit request that passed every check, as the task will be stored."""

    base_model: str
    dataset_path: str  # resolved, inside a dataset root
    dataset_format: str
    dataset_sha256: str  # of the bytes validated: the task's snapshot of the file must match
    examples: int
    method: str
    priority: str  # high | normal | low
    preemptible: bool
    hyperparameters: dict[str, Any]
    gpus: int
    memory_gb: float  # per GPU: as given, or the estimate
    timeout_s: float
    dataset_snapshot: bytes | None = None  # the JSONL to store as the task's snapshot (a table, a mix); None: copy the file
    dataset_sources: list[dict[str, Any]] | None = None  # a mix's: path, ratio, examples, taken
    business_tag: str | None = None  # the business its GPU-seconds are billed to (None: `(finetune)`)


class Intake:
    def __init__(self, settings: Settings, inventory: Callable[[], GpuInventory], runner: TrainerRunner) -> None:
        self.settings = settings
        self.inventory = inventory  # a fresh NVML read: is there a GPU at all, and the largest one
        self.runner = runner
        self._previews = asyncio.Semaphore(2)

    def check_submit(self, *, base_model: str, dataset_path: str | None, method: str, priority: str, gpus: int | None,
                     memory_gb: float | None, timeout_s: float | None, hyperparameters: Mapping[str, Any] | None,
                     preemptible: bool | None, datasets: list[Any] | None = None,
                     business_tag: str | None = None) -> Submission:
        method = request_rules.check_method(method)
        priority = request_rules.check_priority(priority)
        preemptible = request_rules.check_preemptible(preemptible, priority)  # default: true below high
        business = None if business_tag is None else check_business(business_tag)
        hp = hyperparameter_rules.validate(hyperparameters, method)  # the one check of the API, the CLI and the UI
        check_base_model(base_model)
        sources = self.confined_sources(dataset_path, datasets)  # before a file is opened
        dataset = read_sources(sources, hp["seed"], mixed=datasets is not None,
                               parser=parse_preference if method in request_rules.PREFERENCE_METHODS else parse)
        if method in request_rules.PREFERENCE_METHODS and len(dataset.formats) > 1:  # TRL takes one shape per dataset
            raise InvalidInput(f"the preference pairs mix strings and message lists ({dataset.format}): give them all as "
                               "strings with a prompt, or all as messages")
        dataset_path = str(sources[0][0])
        if dataset.chat and hp["chatTemplate"] == "model" and (problem := chat_template_problem(base_model, dataset.format)):
            raise InvalidInput(problem)  # a built-in chatTemplate needs nothing from the tokenizer
        inventory = self.inventory()
        has_gpu = inventory.available
        count = request_rules.check_gpus((1 if has_gpu else 0) if gpus is None else gpus, method, has_gpu)
        request_rules.check_memory_gb(memory_gb)
        timeout = request_rules.check_timeout(self.settings.finetune_timeout_s if timeout_s is None else timeout_s)
        self.check_trainer_installed(method, hp["reportTo"])
        need_gb = float(memory_gb) if memory_gb is not None else estimate_gb(base_model, method, hp, count)
        if count:
            check_fits(need_gb, memory_gb is not None, inventory, base_model, method, hp, count)
        return Submission(base_model=base_model, dataset_path=str(Path(dataset_path).resolve()), dataset_format=dataset.format,
                          dataset_sha256=dataset.sha256, examples=len(dataset.examples), method=method, priority=priority, preemptible=preemptible,
                          hyperparameters=hp, gpus=count, memory_gb=need_gb, timeout_s=timeout, dataset_snapshot=dataset.snapshot,
                          dataset_sources=dataset.sources or None, business_tag=business)

    def confined_sources(self, dataset_path: Any, datasets: Any) -> list[tuple[Path, float]]:
        """(path, ratio) of each dataset a request names, each checked and inside the dataset roots."""
        sources = request_rules.check_dataset_sources(dataset_path, datasets)
        fields = ["datasetPath"] if datasets is None else [f"datasets[{i}].path" for i in range(len(sources))]
        return [(confine_dataset(path, self.settings.dataset_roots, field), ratio)
                for (path, ratio), field in zip(sources, fields, strict=True)]

    def check_trainer_installed(self, method: str, report_to: str = "none") -> None:
        """A local trainer needs torch, transformers and peft (bitsandbytes for qlora) in Corral's environment:
        refuse at submit instead of a task that fails seconds later. Looked up, not imported (cheap)."""
        if not isinstance(self.runner, ProcessRunner):  # a Job runs the trainer in its own image
            return
        missing = [name for name in TRAINER_PACKAGES if not importable(name)]
        if missing:
            raise InvalidInput(f"finetuning needs the trainer packages, and {', '.join(missing)} "
                               f"{'is' if len(missing) == 1 else 'are'} not installed in Corral's environment "
                               f"({sys.executable}): pip install 'corral[train]'")
        if method in request_rules.PREFERENCE_METHODS and (missing := [n for n in PREFERENCE_PACKAGES if not importable(n)]):
            raise InvalidInput(f"method {method} trains with TRL, and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                               f"not installed in Corral's environment ({sys.executable}): pip install 'corral[train]'")
        if report_to == "tensorboard" and not importable("tensorboard"):
            raise InvalidInput(f"reportTo tensorboard needs the tensorboard package, which is not installed in Corral's environment "
                               f"({sys.executable}): pip install 'corral[train]', or use reportTo auto or none")
        if method == "qlora" and not all(importable(name) for name in QLORA_PACKAGES):
            raise InvalidInput(f"qlora needs bitsandbytes, which is not installed in Corral's environment ({sys.executable}): "
                               "pip install bitsandbytes (beside 'corral[train]'), or use method 'lora'")

    async def preview(self, *, base_model: str, dataset_path: str | None, max_seq_len: int | None = None,
                      train_on_prompt: bool | None = None, examples: int = 5, chat_template: str | None = None,
                      batch_size: int | None = None, datasets: list[Any] | None = None, method: str = "lora") -> PreviewResult:
        """What the trainer would make of a dataset, before any GPU is spent: the format, the first examples with
        the tokens the loss covers, and how many examples are truncated or dropped at `maxSeqLen`. The base
        model's tokenizer runs in a child process (transformers stays out of the control plane)."""
        hp = hyperparameter_rules.validate({k: v for k, v in (("maxSeqLen", max_seq_len), ("trainOnPrompt", train_on_prompt),
                                                              ("chatTemplate", chat_template), ("batchSize", batch_size))
                                            if v is not None})
        check_base_model(base_model)
        sources = self.confined_sources(dataset_path, datasets)  # before a file is opened (by the child)
        if not importable("transformers"):
            raise InvalidInput(f"the preview needs transformers in Corral's environment ({sys.executable}): pip install 'corral[train]'")
        request = {"baseModel": base_model, "datasetPath": str(sources[0][0]), "maxSeqLen": hp["maxSeqLen"],
                   "datasets": None if datasets is None else [{"path": str(path), "ratio": ratio} for path, ratio in sources],
                   "trainOnPrompt": hp["trainOnPrompt"], "chatTemplate": hp["chatTemplate"], "examples": max(0, min(int(examples), 50)),
                   "batchSize": hp["batchSize"], "seed": hp["seed"], "method": request_rules.check_method(method)}
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1" if is_dir(base_model) else os.environ.get("HF_HUB_OFFLINE", "0")}
        async with self._previews:  # each child holds a tokenizer (and torch): a few at a time
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "corral.finetune.preview", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env)
            try:
                out, err = await within(PREVIEW_TIMEOUT_S, child.communicate(json.dumps(request).encode()))
            except asyncio.TimeoutError:
                raise InvalidInput(f"the preview took longer than {PREVIEW_TIMEOUT_S:.0f} s; try a smaller dataset") from None
            finally:  # timed out, or the request went away: the child goes too
                if child.returncode is None:
                    child.kill()
                    await child.wait()
        try:
            answer = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise InvalidInput(f"the preview failed: {tail[0][-500:]}") from None
        if "error" in answer:
            raise InvalidInput(answer["error"])
        return PreviewResult.model_validate(answer)


def check_business(tag: Any) -> str:
    """A task's businessTag: a business name by deploy-service's rules (`labels.check_business_tag`: a DNS-1123 label
    of at most 63 characters, not `unassigned`). Given empty, it says to leave it out rather than that it is required."""
    if tag == "":
        raise InvalidInput("businessTag, when given, is a business name such as 'production': leave it out to bill the "
                           "task under (finetune)")
    return L.check_business_tag(tag)


def check_base_model(base_model: str) -> None:
    """A local model directory or a hub id (org/name)."""
    check_path_text(base_model, "baseModel")
    if not (is_dir(base_model) or HUB_ID.fullmatch(base_model)):  # the whole text: 'org/name\n' is no hub id
        raise InvalidInput(f"baseModel {short(base_model)!r} is neither a local model directory nor a hub id (org/name)")


def training_estimate(base_model: str, method: str, hp: dict[str, Any], gpus: int = 1,
                      strict: bool = False) -> tuple[ModelSpec, MemoryEstimate] | None:
    """The estimator's figures for a task (per GPU) when its base model can be sized (`corral.model_files`: a local
    directory, the Hugging Face cache, the catalogue by name); else None, or with `strict` the 400 saying what to give."""
    sized = size_model(base_model) if strict else size_model_or_none(base_model)
    if sized is None:
        return None
    spec = sized.spec
    if method in request_rules.PREFERENCE_METHODS:
        # A LoRA adapter on the frozen base, whose forward passes run the chosen and the rejected answer of each example
        # (twice the rows); DPO's reference is the base with the adapter switched off (no second model).
        method, hp = "lora", {k: v for k, v in {**hp, "batchSize": 2 * int(hp.get("batchSize", DEFAULTS["batchSize"]))}.items()
                              if k in ("maxSeqLen", "batchSize", "loraRank", "gradientCheckpointing")}
    try:  # the same mapping from a request to the estimator as the finetune page's recommendation
        setup = submit_setup(method, hp, gpus)
    except InvalidInput:
        if strict:
            raise
        return None  # a hint (the UI's form, half typed) never fails
    return spec, training_memory(spec, setup)


def estimate_gb(base_model: str, method: str, hp: dict[str, Any], gpus: int) -> float:
    """Memory per GPU from the estimator (`corral.model_files` sizes any model on disk or in the catalogue; a GPU
    task whose model it cannot size is refused, saying to give memoryGb). With several GPUs each runs a
    data-parallel process holding a whole copy: the per-process figure, not total ÷ N."""
    estimate = training_estimate(base_model, method, hp, gpus, strict=bool(gpus))
    return round(estimate[1].total_gb, 2) if estimate and gpus else 0.0


def check_fits(need_gb: float, given: bool, inventory: GpuInventory, base_model: str, method: str, hp: dict[str, Any],
               gpus: int) -> None:
    """Refuse a task whose memory per GPU exceeds the largest GPU here: it would wait forever (or OOM)."""
    units = inventory.schedulable_units()
    if not units or need_gb <= 0:
        return
    largest = max(units, key=lambda u: u.memory_total_bytes)
    largest_gb = largest.memory_total_bytes / GIB
    if need_gb <= largest_gb:
        return
    if given:
        raise InvalidInput(f"gpus.memoryGb asks for {need_gb:.1f} GB per GPU, more than the largest GPU here ({largest.name}, "
                           f"{largest_gb:.1f} GB)")
    spec = training_estimate(base_model, method, hp, gpus)
    what = f"{spec[0].display} {method}" if spec else method
    raise InvalidInput(
        f"{what} needs an estimated {need_gb:.1f} GB per GPU (maxSeqLen {hp['maxSeqLen']}, batchSize {hp['batchSize']}, "
        f"{gpus} GPU{'s' if gpus > 1 else ''}), more than the largest GPU here ({largest.name}, {largest_gb:.1f} GB): use "
        # qlora only where the submit would take it: one GPU, bitsandbytes installed
        + ("qlora, " if method != "qlora" and gpus == 1 and all(importable(n) for n in QLORA_PACKAGES) else "")
        + "a smaller maxSeqLen or batchSize (with gradientAccumulation), or a smaller model"
        + (", or keep gradientCheckpointing on" if not hp.get("gradientCheckpointing", True) else ""))


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken install, or a module without a spec
        return False


def is_dir(value: str) -> bool:
    try:
        return Path(value).is_dir()
    except (OSError, ValueError):
        return False

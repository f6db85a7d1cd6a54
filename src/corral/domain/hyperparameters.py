"""Finetune hyperparameters: their names, types, ranges and defaults, in one place. Pure: no I/O.

Every way to submit a task (the API, the CLI's `--hp`, the UI's form) goes through `validate`, so a
value the trainer cannot use is refused at submit with the same message everywhere, and an integer
(`batchSize: 2`) stays an integer all the way to the trainer (never `2.0`). An integral float where
an integer is expected (`2.0`, as a number field in a form gives) is taken as that integer; `2.5` is
refused, as are booleans, strings, NaN and infinities. Switches take only `true`/`false`, choices only
one of their names.

The defaults follow LLaMA-Factory's: gradient checkpointing on, a cosine schedule with 10% warmup,
gradient clipping at 1.0, the loss on the assistant's turns only, a learning rate by method
(1e-4 for LoRA and QLoRA, 1e-5 for full finetuning) when none is given, and LoRA's alpha at twice
its rank (the update's scale alpha/rank stays 2 whatever the rank: a fixed 16 halves it at rank 16
and quarters it at 32) with no LoRA dropout, unless given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from corral.domain.errors import InvalidInput

# The `chatTemplate` choices: `model` (the tokenizer's own template) or a built-in one. The names are the
# hyperparameter's (checked here, without I/O); `corral.finetune.templates` holds each name's template text.
MODEL_TEMPLATE = "model"
TEMPLATE_NAMES: tuple[str, ...] = (MODEL_TEMPLATE, "chatml", "qwen", "llama3", "mistral", "gemma")


def _a_number(value: Any) -> Any:
    """Numbers only: pydantic's lax mode would also take `"2"` and `true`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("not a number")
    return value


def _a_switch(value: Any) -> Any:
    """`true` or `false` only: not 1, 0 or "yes"."""
    if not isinstance(value, bool):
        raise ValueError("not a boolean")
    return value


def _a_name(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("not a string")
    return value


Integer = Annotated[int, BeforeValidator(_a_number)]
Real = Annotated[float, BeforeValidator(_a_number)]
Switch = Annotated[bool, BeforeValidator(_a_switch)]
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
ReportTo = Literal["auto", "tensorboard", "none"]
ChatTemplate = Literal[TEMPLATE_NAMES]  # type: ignore[valid-type]
SCHEDULERS: tuple[str, ...] = Scheduler.__args__  # type: ignore[attr-defined]
PRECISIONS: tuple[str, ...] = Precision.__args__  # type: ignore[attr-defined]
REPORT_TO: tuple[str, ...] = ReportTo.__args__  # type: ignore[attr-defined]
LEARNING_RATES = {"lora": 1e-4, "qlora": 1e-4, "full": 1e-5, "dpo": 5e-6, "orpo": 5e-6}  # LLaMA-Factory's examples
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")  # `fullmatch`: `$` would pass a trailing newline


class Hyperparameters(BaseModel):
    """The hyperparameters of a finetune task, with their defaults. Each field's description is the rule
    that a refusal quotes (`hyperparameter batchSize must be an integer from 1 to 4096, got 2.5`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    epochs: Integer = Field(default=3, ge=1, le=1000, description="an integer from 1 to 1000")
    batchSize: Integer = Field(default=4, ge=1, le=4096, description="an integer from 1 to 4096")
    gradientAccumulation: Integer = Field(default=1, ge=1, le=1024, description="an integer from 1 to 1024")
    learningRate: Real | None = Field(default=None, gt=0, le=1, description="a positive number at most 1")
    lrScheduler: Annotated[Scheduler, BeforeValidator(_a_name)] = Field(
        default="cosine", description=f"one of {', '.join(SCHEDULERS)}")
    warmupRatio: Real = Field(default=0.1, ge=0, lt=1, description="a number from 0 to less than 1 (the share of steps)")
    maxGradNorm: Real = Field(default=1.0, ge=0, le=1e6, description="a number from 0 (no clipping) to 1000000")
    weightDecay: Real = Field(default=0.0, ge=0, le=10, description="a number from 0 to 10")
    loraRank: Integer = Field(default=8, ge=1, le=1024, description="an integer from 1 to 1024")
    loraAlpha: Integer | None = Field(default=None, ge=1, le=4096, description="an integer from 1 to 4096")
    loraDropout: Real = Field(default=0.0, ge=0, lt=1, description="a number from 0 to less than 1")
    loraTarget: Annotated[str, BeforeValidator(_a_name)] = Field(
        default="all", max_length=1024,
        description="'all' (every linear layer) or module names separated by commas (e.g. q_proj,v_proj)")
    useDora: Switch = Field(default=False, description="true or false (weight-decomposed LoRA)")
    useRslora: Switch = Field(default=False, description="true or false (rank-stabilised LoRA scaling)")
    packing: Switch = Field(default=False, description="true or false (several examples in each maxSeqLen row, each "
                                                        "attending to itself only: fewer padding tokens and steps)")
    maxSeqLen: Integer = Field(default=1024, ge=16, le=1_048_576, description="an integer from 16 to 1048576")
    trainOnPrompt: Switch = Field(default=False, description="true or false (false: the loss covers the assistant's turns only)")
    chatTemplate: Annotated[ChatTemplate, BeforeValidator(_a_name)] = Field(
        default="model", description=f"one of {', '.join(TEMPLATE_NAMES)} (model: the tokenizer's own chat template; a name: "
                                     "that built-in template instead, e.g. for a base model's tokenizer that has none)")
    gradientCheckpointing: Switch = Field(default=True, description="true or false")
    precision: Annotated[Precision, BeforeValidator(_a_name)] = Field(
        default="auto", description="one of auto (bf16 where the GPU supports it, else fp16; fp32 on the CPU), bf16, fp16, fp32")
    prefBeta: Real = Field(default=0.1, gt=0, le=100, description="a positive number at most 100 (dpo and orpo: DPO's "
                                                                  "beta, ORPO's lambda; LLaMA-Factory's pref_beta)")
    pureBf16: Switch = Field(default=False, description="true or false (method full only: weights, gradients and Adam's "
                                                        "states in bf16, no fp32 master copy: about half the memory, and "
                                                        "updates below bf16's precision are lost)")
    valSize: Real = Field(default=0, ge=0, le=1_000_000,
                          description="a share of the examples below 1 (e.g. 0.1), or a whole number of examples, held out for "
                                      "the eval loss (0: none)")
    reportTo: Annotated[ReportTo, BeforeValidator(_a_name)] = Field(
        default="auto", description="one of auto (tensorboard when it is installed, else none), tensorboard (event files in the "
                                    "task's directory: progress.logDir), none")
    earlyStoppingPatience: Integer = Field(
        default=0, ge=0, le=1000, description="an integer from 0 (off) to 1000: stop after this many evaluations in a row "
                                              "without the eval loss improving (needs valSize)")
    earlyStoppingThreshold: Real = Field(default=0.0, ge=0, le=1e6, description="a number from 0 to 1000000: the least "
                                                                                 "drop of the eval loss that counts as better")
    saveSteps: Integer = Field(default=50, ge=1, le=1_000_000, description="an integer from 1 to 1000000")
    saveTotalLimit: Integer = Field(default=2, ge=1, le=1000, description="an integer from 1 to 1000 (checkpoints kept)")
    seed: Integer = Field(default=42, ge=0, le=2**32 - 1, description=f"an integer from 0 to {2**32 - 1}")

    @field_validator("loraTarget")
    @classmethod
    def _modules(cls, value: str) -> str:
        if value != "all" and not all(MODULE_NAME.fullmatch(name.strip()) for name in value.split(",")):
            raise ValueError("not module names")
        return ",".join(name.strip() for name in value.split(","))

    @field_validator("valSize")
    @classmethod
    def _share_or_count(cls, value: float) -> float | int:
        if value >= 1:
            if not float(value).is_integer():
                raise ValueError("not a whole number of examples")
            return int(value)
        return value


DEFAULTS: dict[str, Any] = Hyperparameters().model_dump()
INTEGERS = frozenset(name for name, f in Hyperparameters.model_fields.items()
                     if f.annotation is int or f.annotation == Integer | None)  # loraAlpha: an int, or by rank
SWITCHES = frozenset(name for name, f in Hyperparameters.model_fields.items() if f.annotation is bool)
CHOICES: dict[str, tuple[str, ...]] = {"lrScheduler": SCHEDULERS, "precision": PRECISIONS, "chatTemplate": TEMPLATE_NAMES,
                                        "reportTo": REPORT_TO}
TEXTS = frozenset({"loraTarget"})
_SHOWN_DEFAULTS = {"learningRate": "1e-4 for lora and qlora, 1e-5 for full, 5e-6 for dpo and orpo", "loraAlpha": "2 × loraRank"}
BY_OTHERS = ("learningRate", "loraAlpha")  # defaults that depend on other values: null means "not given"
HYPERPARAMETERS_HELP = "name → value; unknown names are refused. " + "; ".join(
    f"{name}: {f.description} (default {_SHOWN_DEFAULTS.get(name, f.default)})" for name, f in Hyperparameters.model_fields.items())


def _shown(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "…"


def default_learning_rate(method: str) -> float:
    return LEARNING_RATES.get(method, LEARNING_RATES["lora"])


def validate(values: Mapping[str, Any] | Hyperparameters | None, method: str = "lora") -> dict[str, Any]:
    """Every hyperparameter (defaults for those not given; the learning rate by `method`), each of the type and
    in the range the trainer needs; InvalidInput naming the first one that is not, and what it must be."""
    if isinstance(values, Hyperparameters):
        checked = values.model_dump()
    else:
        values = dict(values or {})
        unknown = sorted(str(k) for k in values if k not in Hyperparameters.model_fields)
        if unknown:
            raise InvalidInput(f"unknown hyperparameter(s) {', '.join(unknown)}; known: {', '.join(Hyperparameters.model_fields)}")
        for name in BY_OTHERS:  # null in JSON: "by method" / "by rank", as if not given
            if name in values and values[name] is None:
                values.pop(name)
        try:
            checked = Hyperparameters.model_validate(values).model_dump()
        except ValidationError as exc:
            name = str(exc.errors()[0]["loc"][0])
            rule = Hyperparameters.model_fields[name].description
            raise InvalidInput(f"hyperparameter {name} must be {rule}, got {_shown(values[name])}") from None
    if checked["pureBf16"] and method != "full":
        raise InvalidInput(f"hyperparameter pureBf16 is for method full (a {method} task keeps the base model in "
                           f"{'4' if method == 'qlora' else '16'}-bit already and trains only the adapter): set pureBf16 false, "
                           "or use method full")
    if checked["earlyStoppingPatience"] and not checked["valSize"]:
        raise InvalidInput("hyperparameter earlyStoppingPatience needs an eval split to watch: set valSize (e.g. 0.1), or "
                           "earlyStoppingPatience 0")
    if checked["learningRate"] is None:
        checked["learningRate"] = default_learning_rate(method)
    if checked["loraAlpha"] is None:
        checked["loraAlpha"] = default_lora_alpha(checked["loraRank"])
    return checked


def default_lora_alpha(rank: int) -> int:
    """LLaMA-Factory's default: twice the rank (capped at the field's 4096)."""
    return min(4096, 2 * int(rank))


def for_trainer(values: Mapping[str, Any], method: str | None = None) -> dict[str, Any]:
    """A task's stored hyperparameters as the trainer uses them: defaults filled in (a task queued by an older
    Corral lacks the newer ones), integers as `int` (it may also hold `2.0`)."""
    merged = {**DEFAULTS, **values}
    if merged.get("learningRate") is None and method is not None:
        merged["learningRate"] = default_learning_rate(method)
    if merged.get("loraAlpha") is None:
        merged["loraAlpha"] = default_lora_alpha(merged["loraRank"])
    return {k: int(v) if k in INTEGERS and isinstance(v, float) and v.is_integer() else v for k, v in merged.items()}

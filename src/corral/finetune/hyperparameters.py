"""Finetune hyperparameters: their names, types, ranges and defaults, in one place.

Every way to submit a task (the API, the CLI's `--hp`, the UI's form) goes through `validate`, so a
value the trainer cannot use is refused at submit with the same message everywhere, and an integer
(`batchSize: 2`) stays an integer all the way to the trainer (never `2.0`). An integral float where
an integer is expected (`2.0`, as a number field in a form gives) is taken as that integer; `2.5` is
refused, as are booleans, strings, NaN and infinities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from corral.domain.errors import InvalidInput


def _a_number(value: Any) -> Any:
    """Numbers only: pydantic's lax mode would also take `"2"` and `true`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("not a number")
    return value


Integer = Annotated[int, BeforeValidator(_a_number)]
Real = Annotated[float, BeforeValidator(_a_number)]


class Hyperparameters(BaseModel):
    """The hyperparameters of a finetune task, with their defaults. Each field's description is the rule
    that a refusal quotes (`hyperparameter batchSize must be an integer from 1 to 4096, got 2.5`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    epochs: Integer = Field(default=3, ge=1, le=1000, description="an integer from 1 to 1000")
    batchSize: Integer = Field(default=4, ge=1, le=4096, description="an integer from 1 to 4096")
    gradientAccumulation: Integer = Field(default=1, ge=1, le=1024, description="an integer from 1 to 1024")
    learningRate: Real = Field(default=2e-4, gt=0, le=1, description="a positive number at most 1")
    loraRank: Integer = Field(default=8, ge=1, le=1024, description="an integer from 1 to 1024")
    loraAlpha: Integer = Field(default=16, ge=1, le=4096, description="an integer from 1 to 4096")
    loraDropout: Real = Field(default=0.05, ge=0, lt=1, description="a number from 0 to less than 1")
    maxSeqLen: Integer = Field(default=1024, ge=16, le=1_048_576, description="an integer from 16 to 1048576")
    saveSteps: Integer = Field(default=50, ge=1, le=1_000_000, description="an integer from 1 to 1000000")
    seed: Integer = Field(default=42, ge=0, le=2**32 - 1, description=f"an integer from 0 to {2**32 - 1}")


DEFAULTS: dict[str, int | float] = Hyperparameters().model_dump()
INTEGERS = frozenset(name for name, f in Hyperparameters.model_fields.items() if f.annotation is int)
HYPERPARAMETERS_HELP = "name → number; unknown names are refused. " + "; ".join(
    f"{name}: {f.description} (default {f.default})" for name, f in Hyperparameters.model_fields.items())


def _shown(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "…"


def validate(values: Mapping[str, Any] | Hyperparameters | None) -> dict[str, int | float]:
    """Every hyperparameter (defaults for those not given), each of the type and in the range the trainer
    needs; InvalidInput naming the first one that is not, and what it must be."""
    if isinstance(values, Hyperparameters):
        return values.model_dump()
    values = dict(values or {})
    unknown = sorted(str(k) for k in values if k not in Hyperparameters.model_fields)
    if unknown:
        raise InvalidInput(f"unknown hyperparameter(s) {', '.join(unknown)}; known: {', '.join(Hyperparameters.model_fields)}")
    try:
        return Hyperparameters.model_validate(values).model_dump()
    except ValidationError as exc:
        name = str(exc.errors()[0]["loc"][0])
        rule = Hyperparameters.model_fields[name].description
        raise InvalidInput(f"hyperparameter {name} must be {rule}, got {_shown(values[name])}") from None


def for_trainer(values: Mapping[str, Any]) -> dict[str, Any]:
    """A task's stored hyperparameters as the trainer uses them: defaults filled in, integers as `int` (a
    task queued by an older Corral may hold `2.0`)."""
    merged = {**DEFAULTS, **values}
    return {k: int(v) if k in INTEGERS and isinstance(v, float) and v.is_integer() else v for k, v in merged.items()}

"""The pure checks of a finetune submit request (corral.domain.finetune_request): the messages the API, the CLI and the
UI show, without a machine to check against."""

from __future__ import annotations

import math

import pytest

from corral.domain import finetune_request as rules
from corral.domain.errors import InvalidInput


@pytest.mark.parametrize(("check", "message"), [
    (lambda: rules.check_method("ppo"), "method must be one of lora, qlora, full, dpo, orpo, got 'ppo'"),
    (lambda: rules.check_priority("urgent"), "priority must be high, normal or low, got 'urgent'"),
    (lambda: rules.check_priority(None), "priority must be high, normal or low, got 'None'"),
    (lambda: rules.check_preemptible("yes", "normal"), "preemptible must be true or false, got yes"),
    (lambda: rules.check_path_text("", "baseModel"), "baseModel is required"),
    (lambda: rules.check_path_text("a" * 5000, "datasetPath"), "datasetPath is 5000 characters long; at most 4096 are allowed"),
    (lambda: rules.check_path_text("a\x00b", "baseModel"), "baseModel must not contain a NUL byte"),
    (lambda: rules.check_gpus(True, "lora", True), "gpus must be an integer from 0 to 64, got True"),
    (lambda: rules.check_gpus(65, "lora", True), "gpus must be an integer from 0 to 64, got 65"),
    (lambda: rules.check_gpus(1, "lora", False), "this machine has no GPU: submit with gpus 0 to train on the CPU"),
    (lambda: rules.check_gpus(0, "qlora", True), "qlora needs a GPU (bitsandbytes 4-bit); use method 'lora' on the CPU"),
    (lambda: rules.check_memory_gb(math.nan), "gpus.memoryGb must be a number of GB from 0 to 1000000, got NaN"),
    (lambda: rules.check_timeout(0), "timeoutSeconds must be a positive number of seconds, at most 31622400 (366 days), got 0"),
    (lambda: rules.check_timeout(math.inf), "timeoutSeconds must be a positive number of seconds, at most 31622400 (366 days), "
                                            "got Infinity"),
])
def test_refusals_say_what_is_wrong(check, message: str) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInput) as refused:
        check()
    assert refused.value.message == message


def test_accepted_values_as_stored() -> None:
    assert rules.check_priority("HIGH") == "high" and rules.check_method("qlora") == "qlora"
    assert rules.check_preemptible(None, "high") is False and rules.check_preemptible(None, "low") is True
    assert rules.check_preemptible(True, "high") is True
    assert rules.check_gpus(1, "qlora", True) == 1 and rules.check_gpus(0, "lora", False) == 0
    assert rules.check_timeout(60) == 60.0 and type(rules.check_timeout(60)) is float
    assert rules.short("x" * 300).endswith("… (300 characters)") and rules.short(-math.inf) == "-Infinity"

"""Issue 26 item 4: every name check matches the whole text. Python's `re.match(r"^...$", value)` passes a value
ending in a newline (`$` matches before it), so 'production\\n' was a business beside 'production', and
'simulator-m9\\n' a deployment with a manifest file of that name. One test per kind of name."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from corral.api.schemas import EnvName
from corral.domain import labels as L
from corral.domain.adapters import check_adapter_name
from corral.domain.assignment import check_business_for_model
from corral.domain.deploy_request import DeploySpec, check_deploy, check_secret_env
from corral.domain.distribution import targets_from_counts, targets_from_ratios
from corral.domain.errors import InvalidInput, NotFound
from corral.domain.hyperparameters import MODULE_NAME
from corral.model_files import HUB_ID, cached_snapshot

NEWLINE = "a newline (\\n)"


def refusal(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(InvalidInput) as caught:
        call(*args, **kwargs)
    message = caught.value.message
    assert "\n" not in message, "the refusal shows the newline escaped, on one line"
    return message


@pytest.mark.parametrize("value", ["production\n", "production\r", "pro\nduction", "\nproduction", "production\n\n"])
def test_a_label_name_with_a_newline_is_refused(value: str) -> None:
    message = refusal(L.check_name, value, "businessTag")
    assert message.startswith(f"businessTag '{L.shown(value)}' is not a valid name: it contains a ")
    assert "use lowercase letters, digits and '-'" in message
    assert L.check_name("production", "businessTag") == "production"


def test_business_tags_service_names_and_deployment_names() -> None:
    assert NEWLINE in refusal(L.check_business_tag, "production\n")
    assert "serviceName 'chat\\n'" in refusal(L.service_name, "chat\n")
    assert NEWLINE in refusal(L.standard_deployment_name, "simulator", "m9\n")
    assert NEWLINE in refusal(L.pool_name, "simulator", "m9\n")
    services: list = []
    assert NEWLINE in refusal(check_business_for_model, "unassigned\n", "m", services, "businessTag")


def test_a_deploy_with_a_model_tag_ending_in_a_newline_is_refused() -> None:
    spec = DeploySpec(engine="simulator", model_id="sim", model_tag="m9\n")
    message = refusal(check_deploy, spec, needs_gpu=False, check_args=lambda args: None)
    assert message.startswith("modelTag 'm9\\n' is not a valid name: it contains a newline (\\n)")


def test_distribution_keys_ending_in_a_newline_are_refused() -> None:
    assert "business in ratios 'production\\n' is not a valid name" in refusal(targets_from_ratios, {"production\n": 1}, 4)
    assert "business in counts 'testing\\n' is not a valid name" in refusal(targets_from_counts, {"testing\n": 1}, 4)


def test_secret_env_names_ending_in_a_newline_are_refused_by_the_domain_and_the_schema() -> None:
    assert "is not an environment variable name" in refusal(check_secret_env, {"API_KEY\n": "v"})
    assert check_secret_env({"API_KEY": "v"}) == {"API_KEY": "v"}
    names = TypeAdapter(EnvName)  # pydantic-core's regex: `$` is the end of the text
    assert names.validate_python("API_KEY") == "API_KEY"
    with pytest.raises(ValidationError):
        names.validate_python("API_KEY\n")


def test_adapter_names_ending_in_a_newline_are_refused() -> None:
    message = refusal(check_adapter_name, "support-v1\n")
    assert message.startswith("adapterName 'support-v1\\n' may contain only letters")
    assert check_adapter_name("support-v1") == "support-v1"


def test_module_names_and_hub_ids_match_whole() -> None:
    assert MODULE_NAME.fullmatch("q_proj") and not MODULE_NAME.fullmatch("q_proj\n")
    assert HUB_ID.fullmatch("Qwen/Qwen3-0.6B") and not HUB_ID.fullmatch("Qwen/Qwen3-0.6B\n")
    assert cached_snapshot("Qwen/Qwen3-0.6B\n") is None


@pytest.mark.parametrize(("value", "expected"), [
    ("simulator-m9", NotFound), ("simulator-m9\n", InvalidInput), ("Simulator", InvalidInput), ("", InvalidInput),
])
def test_a_lookup_of_text_that_could_never_be_a_name_is_a_400(value: str, expected: type) -> None:
    """A name that names nothing is a 404; text that could never be a name is a malformed request (400)."""
    missing = NotFound(f"deployment '{value}' not found")
    answer = L.unknown_name(value, "deploymentName", missing)
    assert type(answer) is expected
    if expected is InvalidInput:
        assert "deploymentName" in answer.message and "\n" not in answer.message
    else:
        assert answer is missing

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.domain import labels as L
from corral.domain.errors import InvalidInput


@pytest.mark.parametrize("name", ["qwen-06b", "a", "0", "a" * 63, "vllm-qwen-06b-pool"])
def test_valid_names(name: str) -> None:
    assert L.check_name(name, "modelTag") == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "is required"),
        ("Qwen", "not a valid name"),
        ("qwen_06b", "not a valid name"),
        ("-qwen", "not a valid name"),
        ("qwen-", "not a valid name"),
        ("qwen.06b", "not a valid name"),
        ("a" * 64, "64 characters long; at most 63"),
        (None, "is required"),
    ],
)
def test_invalid_names_say_what_to_fix(name: object, fragment: str) -> None:
    with pytest.raises(InvalidInput) as error:
        L.check_name(name, "modelTag")
    assert fragment in error.value.message and "modelTag" in error.value.message


@given(st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True))
def test_every_dns1123_label_is_accepted(name: str) -> None:
    assert L.check_name(name, "x") == name


def test_naming_rules_of_spec_01() -> None:
    assert L.pool_name("vllm", "qwen-06b") == "vllm-qwen-06b-pool"
    assert L.standard_deployment_name("sglang", "qwen-06b") == "sglang-qwen-06b"
    assert L.service_name("production-chat") == "production-chat-nlb"
    assert L.service_name("production-chat-nlb") == "production-chat-nlb"
    assert L.display_name_of("production-chat-nlb") == "production-chat"
    with pytest.raises(InvalidInput, match="at most 63"):
        L.pool_name("simulator", "m" * 50)


def test_unassigned_is_not_a_business() -> None:
    with pytest.raises(InvalidInput, match="reserved"):
        L.check_business_tag("unassigned")


def test_pool_pod_is_identified_by_type_and_model_whatever_its_business() -> None:
    labels = L.pool_labels(model_tag="qwen-06b", pool="vllm-qwen-06b-pool", engine="vllm")
    assert labels["business"] == "unassigned" and L.is_pool_pod(labels)
    assert L.is_pool_pod({**labels, "business": "production"})
    assert not L.is_pool_pod({k: v for k, v in labels.items() if k != "model"})
    assert not L.is_pool_pod(L.standard_labels(model_tag="qwen-06b", deployment="vllm-qwen-06b"))


def test_business_selector_matches_only_its_business() -> None:
    selector = L.business_selector("qwen-06b", "production")
    pod = L.pool_labels(model_tag="qwen-06b", pool="p", engine="vllm")
    assert L.matches(selector, {**pod, "business": "production"})
    assert not L.matches(selector, {**pod, "business": "testing"})
    assert not L.matches(selector, {**pod, "model": "llama", "business": "production"})

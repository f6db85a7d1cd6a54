"""Label keys, reserved values and name rules of spec 01.

The whole mechanism rests on labels, as in Kubernetes: a replica carries `model`, `business`,
`pool-type`, `deployment-type` and `pool`; a business service selects `{model, business}`.
Every name and label value Corral creates must be a valid DNS-1123 label, checked here before
anything is created, so that the local run and a cluster accept exactly the same inputs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from corral.domain.errors import CorralError, InvalidInput

# Label keys (spec 01, "Labels").
MODEL = "model"
BUSINESS = "business"
POOL_TYPE = "pool-type"
DEPLOYMENT_TYPE = "deployment-type"
POOL = "pool"
SERVICE_TYPE = "service-type"
# Standard (non-pool) replicas are selected by their deployment name, as a plain Deployment's `app`.
APP = "app"

# Label values.
UNASSIGNED = "unassigned"
MODEL_POOL = "model-pool"
BUSINESS_SERVICE = "business-service"
STANDARD = "standard"

SERVICE_SUFFIX = "-nlb"
POOL_SUFFIX = "-pool"
MAX_NAME_LENGTH = 63

# Matched with `fullmatch`, never `match` + `$`: Python's `$` also matches before a trailing newline, so
# `re.match(r"^[a-z]+$", "production\n")` passes, and 'production\n' would be a second business beside
# 'production' (and a deployment, a manifest file, a label value no cluster accepts).
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def control_character(value: str) -> str | None:
    """The first control character (NUL, newline, escape, ...) of `value`, written readably, or None."""
    found = _CONTROL.search(value)
    if found is None:
        return None
    return {"\x00": "a NUL byte (\\x00)", "\n": "a newline (\\n)", "\r": "a carriage return (\\r)",
            "\t": "a tab (\\t)"}.get(found.group(), f"the control character \\x{ord(found.group()):02x}")


def shown(value: str) -> str:
    """`value` as a message quotes it: control characters escaped (`production\\n`), so a refusal shows the
    newline that made the name invalid instead of breaking its own line."""
    return value if value.isprintable() else value.encode("unicode_escape").decode("ascii")


def _invalid(value: str, field: str) -> InvalidInput:
    char = control_character(value)
    return InvalidInput(
        f"{field} '{shown(value)}' is not a valid name: " + (f"it contains {char}; " if char else "")
        + "use lowercase letters, digits and '-', starting and ending with a letter or digit (e.g. 'qwen-06b')"
    )


def check_name(value: object, field: str) -> str:
    """Return `value` if it is a DNS-1123 label, else raise with a message that says how to fix it."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{field} is required: a lowercase name such as 'qwen-06b'")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidInput(
            f"{field} '{shown(value)}' is {len(value)} characters long; at most {MAX_NAME_LENGTH} are allowed"
        )
    if not _DNS1123_LABEL.fullmatch(value):
        raise _invalid(value, field)
    return value


def unknown_name(value: object, field: str, not_found: CorralError) -> CorralError:
    """What to raise for `value`, which names nothing that exists: `not_found` (404) for a name, but a 400 saying
    why for text that could never be one ('production\\n', 'Prod'): such a request is malformed, not late. Only
    asked once the lookup failed, so an object an older Corral created under such a name can still be deleted."""
    if isinstance(value, str) and _DNS1123_LABEL.fullmatch(value):
        return not_found
    if not isinstance(value, str) or not value:
        return InvalidInput(f"{field} is required: a lowercase name such as 'qwen-06b'")
    return _invalid(value, field)


def check_business_tag(value: object, field: str = "businessTag") -> str:
    """A business tag that names a real business (so never the reserved `unassigned`)."""
    tag = check_name(value, field)
    if tag == UNASSIGNED:
        raise InvalidInput(f"{field} '{UNASSIGNED}' is reserved for replicas without a business")
    return tag


def pool_name(engine: str, model_tag: str) -> str:
    return check_name(f"{engine}-{model_tag}{POOL_SUFFIX}", "pool name (<engine>-<modelTag>-pool)")


def standard_deployment_name(engine: str, model_tag: str) -> str:
    return check_name(f"{engine}-{model_tag}", "deployment name (<engine>-<modelTag>)")


def service_name(display_name: str) -> str:
    """`production-chat` → `production-chat-nlb`; a name that already ends in `-nlb` is kept."""
    check_name(display_name, "serviceName")
    if display_name.endswith(SERVICE_SUFFIX):
        return display_name
    return check_name(f"{display_name}{SERVICE_SUFFIX}", "service name (<serviceName>-nlb)")


def display_name_of(service: str) -> str:
    return service[: -len(SERVICE_SUFFIX)] if service.endswith(SERVICE_SUFFIX) else service


def pool_labels(*, model_tag: str, pool: str, engine: str) -> dict[str, str]:
    """Labels of a new pool replica: it always starts unassigned."""
    return {
        MODEL: model_tag,
        POOL: pool,
        BUSINESS: UNASSIGNED,
        POOL_TYPE: engine,
        DEPLOYMENT_TYPE: MODEL_POOL,
    }


def standard_labels(*, model_tag: str, deployment: str) -> dict[str, str]:
    return {MODEL: model_tag, APP: deployment, DEPLOYMENT_TYPE: STANDARD}


def business_selector(model_tag: str, business: str) -> dict[str, str]:
    return {MODEL: model_tag, BUSINESS: business}


def is_pool_pod(labels: Mapping[str, str]) -> bool:
    """A pool pod has `deployment-type=model-pool` and a `model` label, whatever its business.

    (Spec 01 resolved contradiction: not "business == unassigned", which would hide assigned pods.)
    """
    return labels.get(DEPLOYMENT_TYPE) == MODEL_POOL and bool(labels.get(MODEL))


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Kubernetes equality-based selector semantics: every selector pair must be present."""
    return all(labels.get(key) == value for key, value in selector.items())

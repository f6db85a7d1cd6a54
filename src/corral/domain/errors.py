"""Refusals as domain facts: a kind (what went wrong) and hints (what to do next), never an HTTP path or a command.

A service raises the bare problem with the hints that apply (`NotFound(f"pod '{name}' not found", Hint.LIST_PODS)`);
each front end words the hints for its own reader: the API with its paths (`corral.api.schemas`), the CLI with its
commands (`corral.cli`), and everything else (the UI, logs, history) with the `PLAIN` wording below, which names
no interface. A hint that refers to something (the pool whose adapters to list) finds it in the error's details,
which the API also answers as fields of the error body.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import ClassVar


class ErrorKind(StrEnum):
    """What kind of refusal: each front end maps it to its own form (the API to a status code)."""

    INVALID_INPUT = "invalid_input"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"


class Hint(StrEnum):
    """What to do next. The details a wording may use are named after each member."""

    LIST_PODS = "list-pods"
    LIST_SERVICES = "list-services"  # business services
    LIST_DEPLOYMENTS = "list-deployments"
    LIST_FINETUNE_TASKS = "list-finetune-tasks"
    LIST_ADAPTERS = "list-adapters"  # of the pool `pool`
    REMOVE_ADAPTER = "remove-adapter"  # `adapter` of the pool `pool`, or choose another name
    CREATE_SERVICE = "create-service"  # a business service for the business, or choose one of `choices`
    SCALE_STANDARD = "scale-standard"  # through the endpoint that scales any deployment
    FORCE = "force"  # delete anyway
    FORCE_UNASSIGN = "force-unassign"  # delete anyway, unassigning the pods that would be left without a service
    DEPLOY_AS_POOL = "deploy-as-pool"  # a finetune task's result as its own pool
    SEND_TOKEN = "send-token"  # the API token


# A front end's words for each hint: a `str.format` template over the error's details, appended to the problem
# (so it starts with the punctuation that joins it: "; list ...", " or delete ...").
Wording = Mapping[Hint, str]

PLAIN: Wording = {
    Hint.LIST_PODS: "",
    Hint.LIST_SERVICES: "",
    Hint.LIST_DEPLOYMENTS: "",
    Hint.LIST_FINETUNE_TASKS: "",
    Hint.LIST_ADAPTERS: "",
    Hint.REMOVE_ADAPTER: "; remove it first or choose another name",
    Hint.CREATE_SERVICE: ": create one first or choose one of: {choices}",
    Hint.SCALE_STANDARD: "; scale it as a standard deployment",
    Hint.FORCE: " or delete with force",
    Hint.FORCE_UNASSIGN: " or delete with force (unassigns them)",
    Hint.DEPLOY_AS_POOL: "; deploy it as its own pool",
    Hint.SEND_TOKEN: "",
}


def worded(problem: str, hints: Sequence[Hint], wording: Wording, details: Mapping[str, object]) -> str:
    """The problem followed by each hint in `wording`; a list in the details is written `a, b, c`."""
    values = {k: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in details.items()}
    return problem + "".join(wording[hint].format_map(values) for hint in hints)


class CorralError(Exception):
    """A request Corral refuses: `message` is the bare problem, `hints` what to do about it, and `details` extra
    facts for the reader (the counts of a refused scale-down; what a hint refers to)."""

    kind: ClassVar[ErrorKind] = ErrorKind.INVALID_INPUT

    def __init__(self, message: str, *hints: Hint, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.hints = hints
        self.details = details

    def worded(self, wording: Wording) -> str:
        return worded(self.message, self.hints, wording, self.details)

    def __str__(self) -> str:
        return self.worded(PLAIN)


class InvalidInput(CorralError):
    kind = ErrorKind.INVALID_INPUT


class NotFound(CorralError):
    kind = ErrorKind.NOT_FOUND


class Conflict(CorralError):
    """Valid input that the current state does not allow (e.g. not enough unassigned pods)."""

    kind = ErrorKind.CONFLICT


class Unavailable(CorralError):
    """The change is recorded but a part of reality (the data plane) has not confirmed it in time;
    the reconciler keeps applying it."""

    kind = ErrorKind.UNAVAILABLE

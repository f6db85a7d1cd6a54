"""Schemathesis against a real `corral serve`'s /openapi.json: every operation, positive and negative examples,
with no token configured, and with one (requests with the token, and anonymous ones): no 5xx answer, and
no response outside the document (status and body schema of the declared responses).

Bounded for CI (a few dozen examples per operation and mode, derandomized so CI is repeatable, no
shrinking): about 10 s per run on two cores. Every operation is exercised and none is excluded: none starts
heavy work, since generated bodies never name a real engine, model or dataset (finetune datasets must lie
under the dataset roots, which a generated path does not). A failure lists each failing request as a
curl command. `CORRAL_SCHEMATHESIS_EXAMPLES=200` (and a random seed: `CORRAL_SCHEMATHESIS_RANDOM=1`) digs deeper.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import CorralServer, running_corral

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

EXAMPLES = int(os.environ.get("CORRAL_SCHEMATHESIS_EXAMPLES", "30"))  # per operation and generation mode
RANDOM = bool(os.environ.get("CORRAL_SCHEMATHESIS_RANDOM"))
TOKEN = "schemathesis-token"
CHECKS = [not_a_server_error, response_schema_conformance]


@pytest.fixture(params=[None, TOKEN], ids=["no-token", "token"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CorralServer]:
    with running_corral(tmp_path / "data", {"CORRAL_GATEWAY_DATA_PLANE": "python"}, token=request.param) as corral:
        yield corral


def exercise(operation: schemathesis.APIOperation, mode: schemathesis.GenerationMode, headers: dict[str, str],
             statuses: Counter[int], failures: list[str]) -> None:
    """EXAMPLES generated requests to one operation: their statuses counted, every failing one recorded."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not RANDOM, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    def run(case: schemathesis.Case) -> None:
        try:
            statuses[case.call_and_validate(headers=headers, checks=CHECKS, timeout=30).status_code] += 1
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 (collected: every failing request is reported)
            failures.append(f"{operation.label} [{mode.value}]: {str(exc).strip()[:800]}\n  "
                            f"{case.as_curl_command(headers=headers)}")

    try:
        run()
    except Unsatisfiable:  # negative mode of an operation without parameters or body: nothing to break
        assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label


def test_every_operation_answers_within_its_document(server: CorralServer) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    callers = [{"Authorization": f"Bearer {server.token}"}, {}] if server.token else [{}]
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    operations = 0
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            for headers in callers:
                exercise(operation, mode, headers, statuses, failures)
    elapsed = time.monotonic() - started
    print(f"{operations} operations, {statuses.total()} requests in {elapsed:.1f} s: {dict(statuses)}")
    assert operations >= 20, f"only {operations} operations in /openapi.json"
    assert statuses.total() + len(failures) >= operations * min(EXAMPLES, 10), "fewer requests than examples asked for"
    if server.token:
        assert statuses[401] > 0, "anonymous mutations were not refused"
    assert not failures, f"{len(failures)} failing requests in {elapsed:.0f} s:\n\n" + "\n\n".join(failures)

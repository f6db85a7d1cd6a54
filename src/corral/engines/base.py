"""The engine interface and registry."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from corral.domain.errors import InvalidInput

# Flags whose value is a secret (an API key, a token, a password): shown as `***` wherever Corral shows an
# engine's command line (API, UI, manifests it writes, the replica log's header). Besides these names, any
# flag ending in one of SECRET_SUFFIXES counts. A secret is better passed as `secretEnv` (e.g. vLLM reads
# VLLM_API_KEY): a command line is visible to every local user in /proc/<pid>/cmdline, an environment is not.
SECRET_FLAGS = frozenset({"--api-key", "--hf-token", "--token", "--password", "--secret", "--ssl-keyfile-password",
                          "--admin-api-key"})
SECRET_SUFFIXES = ("-api-key", "-token", "-password", "-secret")
REDACTED = "***"


def is_secret_flag(flag: str) -> bool:
    return flag.startswith("--") and (flag in SECRET_FLAGS or flag.endswith(SECRET_SUFFIXES))


def redact_args(argv: Iterable[str]) -> list[str]:
    """An argument list with the value of every secret flag (`--api-key V`, `--api-key=V`) replaced by `***`."""
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

    def launch(
        self, *, model_id: str, model_tag: str, port: int, host: str, gpus: int, extra: list[str], replica: str
    ) -> LaunchSpec:
        args = self.server_args(model_id=model_id, model_tag=model_tag, port=port, host=host, gpus=gpus, extra=extra)
        prefix = [sys.executable, "-m", self.module] if self.module else [self.executable_path()]
        return LaunchSpec(argv=prefix + args, env={"CORRAL_REPLICA_NAME": replica})

    def check_installed(self) -> None:
        """Refuse a deploy up front when the engine cannot start here, instead of a crash loop."""
        import importlib.util
        import shutil

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


def register(engine: Engine) -> Engine:
    _REGISTRY[engine.name] = engine
    return engine


def engine_names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def get_engine(name: str) -> Engine:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidInput(f"engine '{_short(name)}' is unknown; choose one of: {', '.join(sorted(_REGISTRY))}") from None


def _short(value: str, limit: int = 80) -> str:
    """A value quoted in a message, cut to a readable length (a message never echoes megabytes)."""
    return value if len(value) <= limit else value[:limit] + f"… ({len(value)} characters)"


def _load() -> None:
    # Importing the modules registers them; kept lazy so `base` has no import cycle.
    from corral.engines import servers  # noqa: F401

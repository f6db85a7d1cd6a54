"""The engine interface and registry."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from corral.domain.errors import InvalidInput


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
        raise InvalidInput(f"engine '{name}' is unknown; choose one of: {', '.join(sorted(_REGISTRY))}") from None


def _load() -> None:
    # Importing the modules registers them; kept lazy so `base` has no import cycle.
    from corral.engines import servers  # noqa: F401

"""Inference engines: how to launch each one and where its health endpoint is.

An engine only builds argument lists (never a shell string), so user input such as `engineArgs`
or a model path can never be interpreted by a shell.
"""

from corral.engines.base import (
    REDACTED,
    Engine,
    LaunchSpec,
    engine_names,
    get_engine,
    is_secret_flag,
    redact_args,
    set_interpreter,
)

__all__ = ["Engine", "LaunchSpec", "get_engine", "engine_names", "redact_args", "is_secret_flag", "REDACTED",
           "set_interpreter"]

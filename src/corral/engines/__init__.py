"""Inference engines: how to launch each one and where its health endpoint is.

An engine only builds argument lists (never a shell string), so user input such as `engineArgs`
or a model path can never be interpreted by a shell.
"""

# The engines register themselves when their module is imported. Importing them here, from the package and not from
# `base`, keeps the registry full for every caller (any `corral.engines.*` import runs this first) without a cycle.
from corral.engines import servers  # noqa: F401
from corral.engines.base import (
    REDACTED,
    Engine,
    HttpCall,
    LaunchSpec,
    SleepSupport,
    engine_names,
    get_engine,
    is_secret_flag,
    redact_args,
    set_interpreter,
)

__all__ = ["Engine", "LaunchSpec", "get_engine", "engine_names", "redact_args", "is_secret_flag", "REDACTED",
           "set_interpreter", "SleepSupport", "HttpCall"]

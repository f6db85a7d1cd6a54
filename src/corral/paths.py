"""Where Corral reads and writes on the machine, and who else may: the data dir is private, and finetune
datasets are read only from configured folders.

- `make_private_dir`: the data dir (database, history, logs, manifests, uploads, task outputs) is created
  0700 and Corral's own files in it 0600 (umask 077 for the control plane's process and its children), so
  no other local user or process reads history, tokens or datasets.
- `confine_dataset`: a dataset path (typed in the UI, sent to the API or the CLI) must lie under one of
  `CORRAL_DATASET_ROOTS` (default: the data dir's uploads and the directory Corral started in), after
  symbolic links are followed. Anything else is refused before the file is opened, so neither the refusal
  nor the dataset check can reveal what a file outside them contains (or whether it exists).
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable
from pathlib import Path

from corral.domain.errors import InvalidInput

PRIVATE_UMASK = 0o077


class OutsideDatasetRoots(InvalidInput):
    """400: the dataset path is not under a dataset root."""


def make_private_dir(path: Path) -> None:
    """Create `path` (0700) and make what Corral writes from now on private (umask 077, process-wide:
    replicas and trainers inherit it). An existing data dir of this user is narrowed to 0700 and its
    database files to 0600."""
    os.umask(PRIVATE_UMASK)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _narrow(path, 0o700)
    for name in ("corral.db", "corral.db-wal", "corral.db-shm"):
        if (path / name).exists():
            _narrow(path / name, 0o600)


def unprivileged_account(name: str, setting: str, refuse_root: bool = True) -> pwd.struct_passwd:
    """The account `name` that a setting (`CORRAL_REPLICA_USER`, `CORRAL_GATEWAY_USER`) names for processes Corral
    starts as someone else: ValueError (said at start) when no such user exists, or, with `refuse_root`, when it is
    root (the point is to leave root)."""
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"{setting}: no user named {name!r} on this machine") from None
    if refuse_root and account.pw_uid == 0:
        raise ValueError(f"{setting}: {name!r} is root; name an unprivileged user")
    return account


def private_file(path: Path) -> None:
    """`path` readable and writable by its owner only (a no-op for files of another user)."""
    _narrow(path, 0o600)


def _narrow(path: Path, mode: int) -> None:
    try:
        if path.stat().st_uid == os.getuid():
            os.chmod(path, mode)
    except OSError:
        pass  # gone, or not ours: nothing to narrow


def confine_dataset(path: str | Path, roots: Iterable[Path], field: str = "datasetPath") -> Path:
    """`path`, resolved (symbolic links followed, relative to the current directory), when it lies under one
    of `roots`; otherwise OutsideDatasetRoots naming the roots. The file is never opened here."""
    raw = str(path).strip()
    if not raw:
        raise InvalidInput(f"{field} is required")
    if "\x00" in raw:
        raise InvalidInput(f"{field} must not contain a NUL byte")
    roots = list(roots)
    try:
        resolved = Path(raw).expanduser().resolve()
        allowed = [root.expanduser().resolve() for root in roots]
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long
        resolved, allowed = None, []
    if resolved is not None and any(resolved == root or resolved.is_relative_to(root) for root in allowed):
        return resolved
    shown = raw if len(raw) <= 200 else raw[:200] + "…"
    folders = ", ".join(str(root) for root in roots) or "none configured"
    raise OutsideDatasetRoots(
        f"{field} '{shown}' is outside the dataset folders ({folders}): upload the file, move it under one of "
        "them, or add its folder to CORRAL_DATASET_ROOTS"
    )

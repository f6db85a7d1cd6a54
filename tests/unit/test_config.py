"""Settings: a relative data dir (the README's default, ./corral-data) becomes absolute once, so nginx's
`-p` prefix, trainers and replicas all read the same paths whatever their working directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import Settings


def test_relative_data_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CORRAL_DATA_DIR", raising=False)
    settings = Settings(data_dir=Path("corral-data"))
    assert settings.data_dir == tmp_path / "corral-data"
    assert settings.manifests_dir == tmp_path / "corral-data" / "deployments"
    assert Settings().data_dir == tmp_path / "corral-data"  # the default too

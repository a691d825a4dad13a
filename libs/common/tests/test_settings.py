"""Settings: a service's own prefix wins over the shared one, which wins over defaults."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from strata.common.settings import ServiceSettings


class AlphaSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="STRATA_ALPHA_", extra="ignore")
    service_name: ClassVar[str] = "alpha"


def test_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STRATA_NATS_URL", "nats://shared:4222")
    monkeypatch.setenv("STRATA_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("STRATA_ALPHA_NATS_URL", "nats://own:4222")
    monkeypatch.setenv("STRATA_DATA_DIR", str(tmp_path))
    settings = AlphaSettings()
    assert settings.nats_url == "nats://own:4222"
    assert settings.log_level == "DEBUG"
    assert settings.data_dir == tmp_path.resolve()
    assert settings.database_url == f"sqlite+aiosqlite:///{tmp_path.resolve()}/alpha.db"
    assert AlphaSettings(nats_url="nats://init:1").nats_url == "nats://init:1"


def test_defaults_need_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("STRATA_NATS_URL", "STRATA_DATA_DIR", "STRATA_ALPHA_PORT"):
        monkeypatch.delenv(key, raising=False)
    settings = AlphaSettings()
    assert settings.data_dir.name == ".data" and settings.data_dir.is_absolute()
    assert settings.instance_id


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_ALPHA_PORT", "99999")
    with pytest.raises(ValidationError):
        AlphaSettings()


def test_describe_hides_passwords() -> None:
    settings = AlphaSettings(
        database_url="postgresql+asyncpg://strata:hunter2@db:5432/alpha", nats_url="nats://u:pw@nats:4222"
    )
    described = settings.describe()
    assert "hunter2" not in str(described) and ":pw@" not in str(described)

"""End-to-end wiring: simulators over a generated fleet, and settings pointing at them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sfsync.settings import Settings, load_settings
from simulators import Faults, Scenario, SimulatorServers, generate_fleet

FLEET_SIZE = 60


@pytest.fixture
def fleet() -> Scenario:
    return generate_fleet(FLEET_SIZE, median_users=12, max_users=300, drift=0.05, seed=11)


@pytest.fixture
def start_fleet(fleet: Scenario) -> Iterator[Callable[..., SimulatorServers]]:
    started: list[SimulatorServers] = []

    def start(scenario: Scenario | None = None, **options: Any) -> SimulatorServers:
        options.setdefault("sm_faults", Faults(latency_ms=1))
        options.setdefault("sharefile_faults", Faults(latency_ms=1))
        options.setdefault("sharefile_page_size", 50)
        sims = SimulatorServers(scenario or fleet, **options)
        sims.start()
        started.append(sims)
        return sims

    yield start
    for sims in started:
        sims.stop()


def settings_env(sims: SimulatorServers, tmp_path: Path, **extra: str) -> dict[str, str]:
    """SFSYNC_* variables for the simulators (also what a worker subprocess gets)."""
    credentials = tmp_path / "sharefile-credentials.json"
    credentials.write_text(json.dumps({"*": sims.sharefile_credentials}))
    env = {
        "SFSYNC_SM_URL": sims.sm_url,
        "SFSYNC_SM_TOKEN": sims.sm_token,
        "SFSYNC_SHAREFILE_TOKEN_URL_TEMPLATE": sims.sharefile_token_url_template,
        "SFSYNC_SHAREFILE_API_URL_TEMPLATE": sims.sharefile_api_url_template,
        "SFSYNC_SHAREFILE_CREDENTIALS_FILE": str(credentials),
        "SFSYNC_RETRY_DELAY_S": "0.3",
        "SFSYNC_HTTP_TOTAL_S": "20",
        "SFSYNC_CONCURRENCY": "8",
    }
    env.update(extra)
    return env


def settings_for(sims: SimulatorServers, tmp_path: Path, **extra: str) -> Settings:
    env = settings_env(sims, tmp_path, **extra)
    return load_settings(**{k.removeprefix("SFSYNC_").lower(): v for k, v in env.items()})


@pytest.fixture(autouse=True)
def no_stray_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("SFSYNC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)

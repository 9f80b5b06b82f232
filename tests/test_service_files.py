"""The systemd unit fits how the agent starts and stops."""

from __future__ import annotations

import configparser
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "config"
UNIT = CONFIG / "host-agent.service"


def _read(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(path.read_text())
    return unit


def test_systemd_unit_matches_the_agents_behaviour() -> None:
    unit = _read(UNIT)
    service = unit["Service"]
    assert service["Type"] == "notify"  # the agent sends READY=1 (tests/test_service.py)
    assert service["ExecStart"].endswith("host-agent run")
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    # A bad configuration, a second agent, or a local file it must not use: none fixes itself.
    assert set(service["RestartPreventExitStatus"].split()) == {"2", "6", "10"}
    assert "-USR1" in service["ExecReload"]
    assert int(service["TimeoutStopSec"]) >= 30
    assert unit["Install"]["WantedBy"] == "default.target"
    # The working directory must exist before ExecStart: it is the one systemd creates.
    assert service["WorkingDirectory"] == f"%S/{service['StateDirectory']}"


def test_the_maintenance_timer_runs_admin_maintain_daily() -> None:
    service = _read(CONFIG / "host-agent-maintain.service")["Service"]
    assert service["Type"] == "oneshot"
    assert service["ExecStart"].endswith("admin maintain")
    assert service["Environment"].startswith("HOST_AGENT_CONFIG=")
    timer = _read(CONFIG / "host-agent-maintain.timer")
    assert timer["Timer"]["OnCalendar"] == "daily"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_the_gateway_unit_runs_the_gateway_with_readiness() -> None:
    service = _read(CONFIG / "host-agent-gateway.service")["Service"]
    assert service["Type"] == "notify"  # serve() sends READY=1 once it listens
    assert service["ExecStart"].endswith("host-agent gateway")
    assert service["KillSignal"] == "SIGTERM"
    assert service["RestartPreventExitStatus"].split() == ["2"]

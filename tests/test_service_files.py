"""The systemd unit fits how the agent starts and stops."""

from __future__ import annotations

import configparser
from pathlib import Path

UNIT = Path(__file__).resolve().parents[1] / "config" / "host-agent.service"


def test_systemd_unit_matches_the_agents_behaviour() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["Type"] == "notify"  # the agent sends READY=1 (tests/test_service.py)
    assert service["ExecStart"].endswith("host-agent run")
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert set(service["RestartPreventExitStatus"].split()) == {"2", "6"}
    assert "-USR1" in service["ExecReload"]
    assert int(service["TimeoutStopSec"]) >= 30
    assert unit["Install"]["WantedBy"] == "default.target"
    # The working directory must exist before ExecStart: it is the one systemd creates.
    assert service["WorkingDirectory"] == f"%S/{service['StateDirectory']}"

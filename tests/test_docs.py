"""The documentation covers every configuration key and every CLI command."""

from __future__ import annotations

import argparse
from pathlib import Path

from host_agent.cli import build_parser
from host_agent.config import all_keys, env_name

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
EXAMPLE = (Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text()


def test_every_config_key_and_its_override_is_documented() -> None:
    for key in all_keys():
        assert f"`{key}`" in README, key
        assert f"`{env_name(key)}`" in README, env_name(key)
        assert f"{key.rsplit('.', 1)[-1]}:" in EXAMPLE, key


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_cli_command_and_option_is_documented() -> None:
    parser = build_parser()
    for name, sub in _commands(parser).items():
        assert f"host-agent {name}" in README, name
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert flag in README, f"{name} {flag}"
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag not in ("--help", "--version"):
                assert flag in README, flag

"""The documentation covers every configuration key and every CLI command."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

from support.data import file_event, insert_file_events, insert_sessions, pg_fetch, session

from host_agent import errors
from host_agent.cli import build_parser
from host_agent.commands.sync import sync_once
from host_agent.config import AgentConfig, all_keys, env_name
from host_agent.errors import HostAgentError

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


def _error_classes(base: type[HostAgentError]) -> list[type[HostAgentError]]:
    found = [base]
    for sub in base.__subclasses__():
        found += _error_classes(sub)
    return found


def test_every_exit_code_of_the_error_tree_is_in_the_readme_table_and_no_other() -> None:
    table = re.findall(r"^\| (\d+) \| ", README, re.MULTILINE)
    documented = {int(code) for code in table}
    raised = {cls.exit_code for cls in _error_classes(HostAgentError)}
    # 0 (done) is not an error; the rest of the table is exactly what the classes carry.
    assert documented - {0} == raised | {1}
    tree = errors.__doc__ or ""
    for cls in _error_classes(HostAgentError):
        assert re.search(rf"\b{cls.__name__}\b.*\b{cls.exit_code}\b", tree), cls.__name__


def _readme_section_sql(title: str) -> list[str]:
    section = README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, re.DOTALL)


async def test_the_see_your_data_queries_run_on_synced_rows(
    schema_url: str, make_config: Callable[..., AgentConfig]
) -> None:
    config = make_config(schema_url)
    insert_sessions(config.database.desktop_activity_db, [session(i) for i in range(5)])
    insert_file_events(config.database.file_events_db, [file_event(i) for i in range(5)])
    assert (await sync_once(config)).synced == 10
    queries = _readme_section_sql("See your data")
    assert len(queries) >= 3
    for sql in queries:
        rows = await pg_fetch(schema_url, sql)
        assert rows, sql


def test_ci_runs_the_readme_test_command_where_no_test_may_skip() -> None:
    """`.ci/run` is what CI starts: it must run the README's test command with CI=true, so a
    missing PostgreSQL, PgBouncer or X server fails the run instead of skipping its tests."""
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    lines = [line.strip() for line in ci.splitlines() if not line.lstrip().startswith("#")]
    assert "export CI=true" in lines
    assert lines.index("export CI=true") < next(
        i for i, line in enumerate(lines) if "scripts/test.sh" in line
    )
    assert "scripts/test.sh     # run the whole test suite" in README

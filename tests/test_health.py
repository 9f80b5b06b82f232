"""Collector metrics as Prometheus reads them: each collector's errors and its own counters."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest

from host_agent.collectors.base import Collector
from host_agent.collectors.desktop import DesktopActivityCollector
from host_agent.collectors.filesystem import FileChangeCollector
from host_agent.config import DesktopCollectorConfig, FilesystemCollectorConfig
from host_agent.daemon.health import AgentMetrics
from host_agent.store.queue import WriteQueue
from host_agent.store.tables import DESKTOP_ACTIVITY, FILE_CHANGES


def test_every_collector_counter_is_a_labelled_gauge(tmp_path: Path) -> None:
    files = WriteQueue.start_for(tmp_path / "files.db", FILE_CHANGES)
    desktop = WriteQueue.start_for(tmp_path / "desktop.db", DESKTOP_ACTIVITY)
    collectors: list[Collector] = [
        FileChangeCollector(FilesystemCollectorConfig(roots=[tmp_path]), files),
        DesktopActivityCollector(DesktopCollectorConfig(), desktop),
    ]
    metrics = AgentMetrics()
    metrics.watch_collectors(lambda: collectors)
    text = generate_latest(metrics.registry).decode()

    assert "# TYPE host_agent_collector_counter gauge" in text
    for collector in collectors:
        name = collector.name
        assert f'host_agent_collector_errors_total{{collector="{name}"}} 0.0' in text
        for counter in collector.counters():
            labels = f'collector="{name}",counter="{counter}"'
            assert f"host_agent_collector_counter{{{labels}}} 0.0" in text
    assert 'counter="watch_limit_hits"' in text and 'counter="sessions_recorded"' in text
    files.close()
    desktop.close()

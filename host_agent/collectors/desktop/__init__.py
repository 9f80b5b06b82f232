"""Desktop activity: which application and window title has focus, and when the user is idle.

| module | owns |
|---|---|
| `collector` | `DesktopActivityCollector`: the worker thread, polling, display resolution, state |
| `supervisor` | the X connection: connect, reconnect with backoff, outage logs, stall watchdog |
| `x11` | the X queries (focused client, its details, idle time) on one connection |
| `sessions` | the pure session state machine (`SessionTracker`) and privacy rules |
| `recorder` | the tracker's commands turned into store writes; row ids; rows left open |
| `rows` | the columns of a session's row |
"""

from host_agent.collectors.desktop.collector import DesktopActivityCollector

__all__ = ["DesktopActivityCollector"]

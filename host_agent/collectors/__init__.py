"""Collectors record what happens on the machine into the local store.

The contract every collector follows is `base.Collector` (the agent, the health endpoint and
the metrics rely on it):

- constructed with its config section, a `RowWriter` for its table, and a structlog logger;
- `async def run(self, stop: asyncio.Event) -> None` records until `stop` is set, then flushes
  what it holds, closes what it opened, and returns. It never raises for conditions it can
  recover from (X server gone, a watch that cannot be placed); it logs them and goes on. A bug
  in a worker thread is logged and shown as the state "failed: see log".
- `name`, `state`, `errors`, `ready` and `counters()` say how it is doing.
- blocking work (X11 calls, filesystem walks, SQLite writes) runs in worker threads started by
  `base.run_in_threads`, never on the event loop thread; collectors never touch the network or
  import `host_agent.sync`.

`desktop/` records focused-window and idle sessions; `filesystem/` records file changes.
"""

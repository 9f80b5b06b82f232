"""One module per CLI command. Each opens what it needs, calls the library, and returns data
for `host_agent.cli` to print; errors are `HostAgentError`s carrying their exit codes."""

"""`host-agent gateway` as a process of its own, for tests: start, wait until it answers,
SIGKILL and restart it on the same port."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from host_agent.embedded.cluster import free_port
from support.agent_process import AgentProcess, agent_env, run_agent, write_config

POLL = 0.05


class GatewayProcess:
    """A gateway in front of `url` (an owner's URL) on a port of its own."""

    def __init__(
        self,
        workdir: Path,
        url: str,
        *,
        pool_size: int = 4,
        max_body_mb: float = 64,
        tls: tuple[Path, Path] | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.tls = tls
        self.ca_file = ca_file
        settings: dict[str, Any] = {
            "listen_address": "127.0.0.1",
            "listen_port": self.port,
            "pool_size": pool_size,
            "max_body_mb": max_body_mb,
            "acquire_timeout_seconds": 2,
        }
        if tls is not None:
            settings["tls_cert_file"], settings["tls_key_file"] = str(tls[0]), str(tls[1])
        self.config = write_config(
            workdir / "gateway.yaml", url=url, data_dir=workdir / "gateway-data",
            host="the-gateway", gateway=settings,
        )  # fmt: skip
        self.process: AgentProcess | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        host = "localhost" if self.tls else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}"

    def start(self, timeout: float = 30) -> GatewayProcess:
        self.process = AgentProcess(
            self.config, "gateway", env=agent_env(), workdir=self.workdir
        ).start()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited: {self.process.output()}")
            try:
                status, _ = self.get("/health")
                if status == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start: {self.process.output()}")
            time.sleep(POLL)  # polling a port another process opens: no event to wait on

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            import signal

            self.process.send(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def _context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)

    def request(
        self, method: str, path: str, *, token: str | None = None, body: bytes | None = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON answer, headers); never raises for an HTTP status."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.url + path, data=body, headers=headers,
                                         method=method)  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30, context=self._context()) as answer:
                return answer.status, json.loads(answer.read() or b"{}"), dict(answer.headers)
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                data = json.loads(text)
            except ValueError:
                data = {"text": text.decode(errors="replace")}
            return exc.code, data, dict(exc.headers)

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        status, data, _ = self.request("GET", path)
        return status, data

    def close(self) -> None:
        if self.process is not None:
            self.process.__exit__(None, None, None)


def add_host_token(admin_config: Path, host: str, cwd: Path) -> str:
    """`admin add-host HOST --token`: the token it prints once."""
    result = run_agent(admin_config, "admin", "add-host", host, "--token", env=agent_env(),
                       cwd=cwd)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    return lines[lines.index("Its gateway.token (shown once, keep it secret):") + 1].strip()

# host-agent, as the dev stack's agent service (docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY host_agent ./host_agent
COPY config ./config
# A normal (non-editable) install: the schema SQL ships inside the package.
RUN pip install --no-cache-dir . \
    && useradd --system --create-home --home-dir /var/lib/host-agent host-agent
USER host-agent
VOLUME ["/var/lib/host-agent"]
# Apply the schema (idempotent), then run until SIGTERM (docker stop).
CMD ["sh", "-c", "host-agent init-db && exec host-agent run"]
STOPSIGNAL SIGTERM

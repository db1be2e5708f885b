# One image for every sfsync role; docker-compose.yml picks the role with its command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY domain domain
COPY adapters adapters
COPY simulators simulators
COPY producers producers
COPY consumers consumers
COPY sfsync sfsync
# /data: where the audit role's SQLite file lives (a volume in docker-compose.yml), writable by
# the user the roles run as; /app stays read-only for it.
RUN pip install --no-cache-dir . && useradd --system sfsync \
    && mkdir /data && chown sfsync /data
USER sfsync
ENTRYPOINT ["sfsync"]

# One image for every sfsync role; docker-compose.yml picks the role with its command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY domain domain
COPY adapters adapters
COPY simulators simulators
COPY producers producers
COPY consumers consumers
COPY sfsync sfsync
RUN pip install --no-cache-dir . && useradd --system sfsync
USER sfsync
ENTRYPOINT ["sfsync"]

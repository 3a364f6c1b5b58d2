# gpumanager in a container.
#
#   docker build -t gpumanager .
#   mkdir -p data && cp config.toml.example data/config.toml   # then edit it
#   docker run -d --name gpumanager -p 8000:8000 -v "$PWD/data:/app/data" gpumanager
#
# Everything that changes lives in one mounted folder, /app/data: config.toml,
# .env (read from beside the config), api_keys.json and state/. A folder,
# not single files: api_keys.json is replaced atomically (write, then rename),
# which a single bind-mounted file does not allow.
# The server runs as uid 10001: a bind-mounted ./data must be writable by it
# (`sudo chown -R 10001 data`), or run with `--user "$(id -u):$(id -g)"`.
# Keep relative paths in config.toml (they are relative to its folder) and
# [server] port = 8000, which the HEALTHCHECK below uses.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/venv/bin/pip install --no-cache-dir ".[cluster]"

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GPUMANAGER_CONFIG=/app/data/config.toml
RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home gpumanager \
    && mkdir -p /app/data \
    && chown -R gpumanager:gpumanager /app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
USER gpumanager
VOLUME /app/data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=3)"]
CMD ["gpumanager", "server"]

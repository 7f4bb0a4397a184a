# syntax=docker/dockerfile:1
# tokensettle as a sidecar: watches the runs an experiment writes into a shared volume and
# settles their token counts against the OpenAI Usage API. docs/docker.md explains it all.
#
#   docker build -t tokensettle .
#   docker run --init -v /srv/experiments/runs:/runs -v tokensettle-state:/var/lib/tokensettle \
#       -v "$PWD/secrets/admin_key:/run/secrets/admin_key:ro" tokensettle
#   docker run --rm -v /srv/experiments/runs:/runs tokensettle list --all
#
# Run it with --init (compose: `init: true`): tini as PID 1 forwards SIGTERM and reaps.
FROM python:3.11-slim

# Only what the package build needs (and .dockerignore keeps the rest out of the context).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon/ ./daemon/
RUN pip install --no-cache-dir --disable-pip-version-check . \
    && rm -rf /src \
    && groupadd --system --gid 10001 tokensettle \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/tokensettle --shell /usr/sbin/nologin tokensettle \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/tokensettle \
    && install -d -o 10001 -g 10001 -m 2770 /runs

# JSON logs on unbuffered stdout; HTTP on all interfaces of the container (publish the port
# on the host's loopback only); the state (SQLite index) in its own volume.
ENV TOKENSETTLE_LOG_FORMAT=json \
    TOKENSETTLE_HTTP_ADDR=0.0.0.0:9464 \
    TOKENSETTLE_STATE_DIR=/var/lib/tokensettle \
    TOKENSETTLE_RUNS_DIRS=/runs \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/tokensettle"]

# Numeric, so Kubernetes' runAsNonRoot can check it; match it (or the group) to the owner
# of the experiments' files: rewritten metrics.json files are owned by this UID.
USER 10001:10001
# Not the state volume: Settings reads a `.env` from the working directory.
WORKDIR /
EXPOSE 9464

# Visibility only: Docker and Compose do not restart unhealthy containers; the daemon exits
# non-zero by itself on fatal errors and `restart:` brings it back. No curl in the image:
# Python's urllib, proxies ignored (HTTP_PROXY may be set for the Usage API), any non-200
# or connection error exits 1.
HEALTHCHECK --interval=30s --timeout=10s --start-period=2m --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; port = os.environ.get('TOKENSETTLE_HTTP_ADDR', '').rpartition(':')[2] or '9464'; r = u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:' + port + '/healthz', timeout=5); sys.exit(0 if r.status == 200 else 1)"]

# ENTRYPOINT + CMD: `docker run IMAGE` is `tokensettle run`, and any arguments replace only
# the subcommand: `docker run IMAGE reconcile --dry-run`, `docker run IMAGE --version`.
# A shell: `docker run --rm -it --entrypoint sh IMAGE`.
ENTRYPOINT ["tokensettle"]
CMD ["run"]

# imsidecar container image.
#
#   docker build -t imsidecar .
#   docker run --rm -p 8080:8080 -p 9464:9464 imsidecar demo --listen 0.0.0.0:8080 --admin-listen 0.0.0.0:9464
#   docker run --rm --read-only -v ./config.yaml:/etc/imsidecar/config.yaml:ro imsidecar
#
# The base only needs `python3` (with the venv module) on PATH: the official slim image has it in /usr/local/bin,
# a Debian one (as .ci/image-check builds) in /usr/bin. Both stages use the same base, so the venv's interpreter
# link stays valid when the venv is copied across.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build

# Package-index settings for builds behind a proxy or mirror. They live in this stage only: nothing from here
# reaches the final image except /opt/imsidecar. Empty values are ignored by pip.
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_TRUSTED_HOST=
ARG PIP_CERT=
ARG PIP_DEFAULT_TIMEOUT=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python3 -m venv /opt/imsidecar

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# Install with the extras the docs promise (redis: `store: {backend: redis}`; fast: uvloop, which every benchmark
# measured), drop the installers (not needed at run time), then compile bytecode now because the runtime root
# filesystem is read-only; unchecked-hash .pyc files stay valid whatever mtimes the COPY below gives the sources.
RUN /opt/imsidecar/bin/python -m pip install '.[redis,fast]' \
 && /opt/imsidecar/bin/python -m pip uninstall --yes --quiet pip setuptools \
 && /opt/imsidecar/bin/python -m compileall -q --invalidation-mode unchecked-hash /opt/imsidecar/lib \
 && /opt/imsidecar/bin/python -c "import proxy.cli, proxy.store_redis, redis, uvloop"

# ---------------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="imsidecar" \
      org.opencontainers.image.description="Sidecar proxy for the Feishu/Lark and DingTalk open APIs" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /opt/imsidecar /opt/imsidecar

# Read-only root filesystem: no bytecode writes, unbuffered logs, and HOME/TMPDIR on /tmp (an emptyDir in the pod).
ENV PATH=/opt/imsidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp

# The events journal's directory (events: queue: journal, the default when events are configured), owned by the
# runtime user and declared a volume, so it stays writable on a read-only root filesystem and outlives the container;
# the Kubernetes manifests mount a volume here.
RUN mkdir -p /var/lib/imsidecar && chown 65532:65532 /var/lib/imsidecar
VOLUME /var/lib/imsidecar

# A numeric user, so Kubernetes' runAsNonRoot can verify it without a passwd entry (distroless "nonroot" uid).
USER 65532:65532
WORKDIR /tmp

# 8080: applications' API traffic; 9464: admin (/healthz, /readyz, /metrics).
EXPOSE 8080 9464

# No curl in slim images; the venv's python asks /healthz. Set IMSIDECAR_HEALTHCHECK_URL if admin_listen moves.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('IMSIDECAR_HEALTHCHECK_URL', 'http://127.0.0.1:9464/healthz'), timeout=2)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["imsidecar"]
CMD ["run", "--config", "/etc/imsidecar/config.yaml"]

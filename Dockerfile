# syntax=docker/dockerfile:1
#
# The agent image: the official apache/airflow image plus the airflow-remote-exec package, with
# `airflow-remote-agent` as its entrypoint. It runs as the image's non-root `airflow` user
# (uid 50000, gid 0), so the Helm chart in helm/airflow-remote-agent can run it with a read-only root
# filesystem.
#
#   docker build -t airflow-remote-agent:0.1.0 .
#   docker run --rm airflow-remote-agent:0.1.0 worker --help
#
# Build arguments:
#   AIRFLOW_VERSION      apache/airflow image tag and the apache-airflow version kept pinned while
#                        installing (default 3.3.2). Use the orchestrator's Airflow version.
#   PYTHON_VERSION       Python of the base image, as in its -pythonX.Y tag suffix (default 3.11).
#   EXTRA_PIP_PACKAGES   Space-separated extra requirements for your tasks, e.g.
#                        "pandas==2.2.3 apache-airflow-providers-snowflake" (default none).
#
# The official image's entrypoint is replaced: it waits for a metadata database, which agents do not
# have. dumb-init stays as PID 1; with DUMB_INIT_SETSID=0 it passes SIGTERM to the agent alone, so a
# worker drains its running tasks instead of every task process being signalled at once.

ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11

FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION} AS build
COPY --chown=airflow:0 pyproject.toml README.md /tmp/src/
COPY --chown=airflow:0 airflow_remote_exec /tmp/src/airflow_remote_exec
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels /tmp/src

FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}
ARG AIRFLOW_VERSION
ARG EXTRA_PIP_PACKAGES=""
# Pinning apache-airflow keeps pip from changing the base image's Airflow to satisfy a dependency.
RUN --mount=type=bind,from=build,source=/tmp/wheels,target=/tmp/wheels \
    pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /tmp/wheels/*.whl ${EXTRA_PIP_PACKAGES}

LABEL org.opencontainers.image.title="airflow-remote-agent" \
      org.opencontainers.image.description="Airflow remote execution agent: worker, dag-processor, triggerer, sentinel" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV AIRFLOW_HOME=/opt/airflow \
    DUMB_INIT_SETSID=0 \
    PYTHONUNBUFFERED=1
USER 50000:0
EXPOSE 8080
ENTRYPOINT ["/usr/bin/dumb-init", "--", "airflow-remote-agent"]
CMD ["--help"]

# syntax=docker/dockerfile:1
# The wattsched image: one image for both components; the Helm chart runs `wattsched operator`
# (Deployment) and `wattsched agent` (DaemonSet) from it.
#
#   docker build -t ghcr.io/wattsched/wattsched:0.1.0 .
#
# Not built or tested in this repository's CI (no container engine there): the chart's tests run
# the chart on a KWOK sandbox, where pods are scheduled but containers never start. The build step
# was checked by hand without Docker: a non-editable `pip install .` of exactly the files copied
# below, into a fresh venv, runs `wattsched --help`, `wattsched operator --help` and
# `wattsched agent --help` from outside the checkout.
#
# NVML: the image carries no NVIDIA driver library. On GPU nodes the NVIDIA container runtime
# injects libnvidia-ml.so.1 and the device nodes into the agent's container (the chart sets
# runtimeClassName: nvidia, NVIDIA_VISIBLE_DEVICES=all, NVIDIA_DRIVER_CAPABILITIES=utility).
# Solvers: highspy's wheel contains HiGHS and PuLP's wheel its CBC fallback, so no system packages.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY optimizer/ optimizer/
COPY agent/ agent/
COPY simulator/ simulator/
RUN python -m venv /opt/wattsched \
 && /opt/wattsched/bin/pip install . \
 && /opt/wattsched/bin/wattsched --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="wattsched" \
      org.opencontainers.image.description="Energy-aware LLM scheduling for Kubernetes: operator and node agent" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/wattsched /opt/wattsched
# The chart mounts the root filesystem read-only with an emptyDir at /tmp: no .pyc writes, and
# matplotlib (pulled in by the simulator) keeps its cache in /tmp.
ENV PATH=/opt/wattsched/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib
# Non-root by default (the operator and the simulated agent run like this). The chart runs the
# nvml agent as UID 0 with only CAP_SYS_ADMIN: docs/security.md explains why.
USER 65532:65532
ENTRYPOINT ["wattsched"]
CMD ["--help"]

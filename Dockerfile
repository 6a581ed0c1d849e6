# syntax=docker/dockerfile:1
# The wattsched image: one image for both components; the Helm chart runs `wattsched operator`
# (Deployment) and `wattsched agent` (DaemonSet) from it.
#
#   docker build -t ghcr.io/wattsched/wattsched:0.1.0 .
#
# CI builds it without Docker: `make image` (sandbox/image.sh) runs this file unchanged with
# buildah, on a local Debian bookworm base (debootstrap) given as PYTHON_IMAGE, and
# tests/chart/test_image_cluster.py runs the operator and simulated agents from the image against
# the sandbox with the chart's args, user and read-only root filesystem. `python3`, not `python`:
# Debian's base has only the former; both bases have it.
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
COPY api/ api/
COPY operator/ operator/
COPY optimizer/ optimizer/
COPY agent/ agent/
COPY simulator/ simulator/
COPY cli/ cli/
# The venv's own pip and setuptools are not needed at run time: removed once the install is done.
RUN python3 -m venv /opt/wattsched \
 && /opt/wattsched/bin/pip install . \
 && /opt/wattsched/bin/pip uninstall --yes pip setuptools \
 && /opt/wattsched/bin/wattsched --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="wattsched" \
      org.opencontainers.image.description="Energy-aware LLM scheduling for Kubernetes: operator and node agent" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/wattsched /opt/wattsched
# The chart mounts the root filesystem read-only with an emptyDir at /tmp: no .pyc writes. The
# simulator's plotting stack (the `simulator` extra) is not installed: `wattsched simulate` says so.
ENV PATH=/opt/wattsched/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root by default (the operator and the simulated agent run like this). The chart runs the
# nvml agent as UID 0 with only CAP_SYS_ADMIN: docs/security.md explains why.
USER 65532:65532
ENTRYPOINT ["wattsched"]
CMD ["--help"]

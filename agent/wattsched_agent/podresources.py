"""Which GPUs each pod holds: the kubelet PodResources API (v1 `List`), and a server speaking it.

On a real node the device plugin, not wattsched, chooses the GPUs a pod gets; the kubelet publishes
its choice on a unix socket (default `/var/lib/kubelet/pod-resources/kubelet.sock`) through the
PodResources v1 gRPC API. `PodResourcesClient.list_gpu_pods` calls `List` and returns, per pod, the
`nvidia.com/gpu` device IDs its containers hold. The NVIDIA device plugin's device IDs are GPU UUIDs
(`GPU-...`); with time-slicing it appends `::<replica>`, which `gpu_uuid` strips.

`PodResourcesServer` serves the same proto on a unix socket from any `lister` function: tests run
the client against it, and the simulated agent (`--pod-resources-dir`) serves each KWOK node's
simulated allocation through it, so simulated nodes take the real client's path.

Not for: deciding limits (see `node_agent`) or anything about NVML.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from wattsched_agent.podresources_v1 import api_pb2, api_pb2_grpc
from wattsched_api.vocabulary import GPU_RESOURCE

DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
LIST_TIMEOUT_SECONDS = 5.0

log = logging.getLogger(__name__)


class PodResourcesError(Exception):
    """The PodResources API could not be read (socket missing, kubelet down, RPC error)."""


@dataclass(frozen=True)
class PodDevices:
    """One pod and the `nvidia.com/gpu` device IDs its containers hold."""

    namespace: str
    name: str
    device_ids: tuple[str, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


def gpu_uuid(device_id: str) -> str:
    """The GPU UUID of a device plugin device ID (`GPU-x::1`, a time-sliced replica, -> `GPU-x`)."""
    return device_id.split("::", 1)[0]


def _target(socket_path: Path) -> str:
    return f"unix://{socket_path.resolve()}"


class PodResourcesClient:
    """Reads the kubelet's device allocation. One channel, reconnecting after a kubelet restart."""

    def __init__(self, socket_path: Path, timeout_seconds: float = LIST_TIMEOUT_SECONDS) -> None:
        self.socket_path = socket_path
        self.timeout_seconds = timeout_seconds
        self._channel: grpc.Channel | None = None
        self._stub: Any = None

    @property
    def where(self) -> str:
        return str(self.socket_path)

    def _connect(self) -> Any:
        if self._stub is None:
            self._channel = grpc.insecure_channel(_target(self.socket_path))
            self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)
        return self._stub

    def list_gpu_pods(self) -> tuple[PodDevices, ...]:
        """Every pod holding `nvidia.com/gpu` devices; raises `PodResourcesError` if unreadable."""
        if not self.socket_path.exists():
            self.close()  # a restarted kubelet makes a new socket: connect afresh
            raise PodResourcesError(f"PodResources socket {self.socket_path} does not exist")
        try:
            response = self._connect().List(
                api_pb2.ListPodResourcesRequest(), timeout=self.timeout_seconds
            )
        except grpc.RpcError as error:
            self.close()
            code = error.code() if hasattr(error, "code") else None
            details = error.details() if hasattr(error, "details") else str(error)
            raise PodResourcesError(
                f"PodResources List on {self.socket_path} failed: {code}: {details}"
            ) from None
        pods = []
        for pod in response.pod_resources:
            device_ids = tuple(
                device_id
                for container in pod.containers
                for devices in container.devices
                if devices.resource_name == GPU_RESOURCE
                for device_id in devices.device_ids
            )
            if device_ids:
                pods.append(PodDevices(pod.namespace, pod.name, device_ids))
        return tuple(pods)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None


class _Lister(api_pb2_grpc.PodResourcesListerServicer):  # type: ignore[misc]
    def __init__(self, lister: Callable[[], Sequence[PodDevices]]) -> None:
        self._lister = lister

    def List(self, request: Any, context: Any) -> Any:  # noqa: N802 (the gRPC method's name)
        return api_pb2.ListPodResourcesResponse(
            pod_resources=[
                api_pb2.PodResources(
                    name=pod.name,
                    namespace=pod.namespace,
                    containers=[
                        api_pb2.ContainerResources(
                            name="main",
                            devices=[
                                api_pb2.ContainerDevices(
                                    resource_name=GPU_RESOURCE, device_ids=list(pod.device_ids)
                                )
                            ],
                        )
                    ],
                )
                for pod in self._lister()
            ]
        )


class PodResourcesServer:
    """A PodResources v1 server on a unix socket answering `List` with what `lister` returns.

    `Get` and `GetAllocatableResources` answer UNIMPLEMENTED (the agent does not call them).
    """

    def __init__(self, socket_path: Path, lister: Callable[[], Sequence[PodDevices]]) -> None:
        self.socket_path = socket_path
        self._lister = lister
        self._server: grpc.Server | None = None

    def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(_Lister(self._lister), server)
        server.add_insecure_port(_target(self.socket_path))
        server.start()
        self._server = server

    def stop(self) -> None:
        """Stop serving and remove the socket (as a kubelet that goes away)."""
        if self._server is not None:
            self._server.stop(grace=None).wait()
        self._server = None
        self.socket_path.unlink(missing_ok=True)

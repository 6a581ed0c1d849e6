"""Prometheus `/metrics` for the agent, with the names and labels of NVIDIA's DCGM exporter.

Dashboards and queries written for dcgm-exporter work unchanged on the agent's metrics:
`DCGM_FI_DEV_POWER_USAGE` (W), `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` (mJ, a counter),
`DCGM_FI_DEV_POWER_MGMT_LIMIT` (W), `DCGM_FI_DEV_GPU_UTIL` (%), `DCGM_FI_DEV_SM_CLOCK` (MHz),
labelled `gpu`, `UUID`, `device`, `modelName`, `Hostname`, and `pod`/`namespace`/`container` for
the pod using the GPU.

The text format is written here rather than with prometheus_client because dcgm-exporter declares
the energy counter as `# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter` without the `_total`
suffix that prometheus_client would add to its metadata. Not for: deciding or applying limits.
"""

from __future__ import annotations

import selectors
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from wattsched_agent.nvml_backend import GpuIdentity, GpuSample
from wattsched_api.vocabulary import DCGM_ENERGY_METRIC

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class PodRef:
    """The pod a GPU is allocated to."""

    namespace: str
    name: str
    container: str = ""


@dataclass(frozen=True)
class GpuMetrics:
    """Everything exported for one GPU."""

    identity: GpuIdentity | None
    sample: GpuSample
    pod: PodRef | None


_FAMILIES: tuple[tuple[str, str, str, Callable[[GpuSample], float | None]], ...] = (
    (
        "DCGM_FI_DEV_POWER_USAGE",
        "gauge",
        "Power draw (in W).",
        lambda sample: sample.draw_watts,
    ),
    (
        DCGM_ENERGY_METRIC,
        "counter",
        "Total energy consumption since boot (in mJ).",
        lambda sample: (
            None if sample.energy_millijoules is None else float(sample.energy_millijoules)
        ),
    ),
    (
        "DCGM_FI_DEV_POWER_MGMT_LIMIT",
        "gauge",
        "Power management limit (in W).",
        lambda sample: sample.applied_watts,
    ),
    (
        "DCGM_FI_DEV_GPU_UTIL",
        "gauge",
        "GPU utilization (in %).",
        lambda sample: (
            None if sample.utilisation_percent is None else float(sample.utilisation_percent)
        ),
    ),
    (
        "DCGM_FI_DEV_SM_CLOCK",
        "gauge",
        "SM clock frequency (in MHz).",
        lambda sample: None if sample.sm_clock_mhz is None else float(sample.sm_clock_mhz),
    ),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def gpu_labels(hostname: str, gpu: GpuMetrics) -> dict[str, str]:
    index = gpu.sample.index
    identity = gpu.identity
    labels = {
        "gpu": str(index),
        "UUID": identity.uuid if identity else "",
        "device": f"nvidia{index}",
        "modelName": identity.nvml_name if identity else "",
        "Hostname": hostname,
    }
    if gpu.pod is not None:
        labels |= {
            "container": gpu.pod.container,
            "namespace": gpu.pod.namespace,
            "pod": gpu.pod.name,
        }
    return labels


def render_metrics(hostname: str, gpus: Sequence[GpuMetrics]) -> str:
    """The exposition text for one node's GPUs; a value NVML could not read is left out."""
    lines: list[str] = []
    for name, metric_type, help_text, value_of in _FAMILIES:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {metric_type}"]
        for gpu in gpus:
            value = value_of(gpu.sample)
            if value is None:
                continue
            labels = ",".join(
                f'{key}="{_escape(text)}"' for key, text in gpu_labels(hostname, gpu).items()
            )
            lines.append(f"{name}{{{labels}}} {value:.17g}")
    return "\n".join(lines) + "\n"


# How often the shared loop checks whether it was told to stop (socketserver's default poll).
LOOP_POLL_SECONDS = 0.5


class MetricsLoop:
    """One daemon thread that accepts the requests of many MetricsServers (one selector over
    their listening sockets; each request is then handled in its own thread, as before).

    An agent serving thousands of simulated nodes otherwise runs one `serve_forever` thread per
    node, each waking every 0.5 s: at 2,286 nodes, 500-2,000 of its threads were runnable at any
    moment (measured from /proc, load average above 1,000), contending for the GIL with the
    reconcile loop. The loop stops when its last server is removed.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)

    def add(self, server: ThreadingHTTPServer) -> None:
        self._selector.register(server, selectors.EVENT_READ, server)
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def remove(self, server: ThreadingHTTPServer) -> None:
        self._selector.unregister(server)
        if not self._selector.get_map():
            self._stop.set()
            self._thread.join()
            self._selector.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _events in self._selector.select(timeout=LOOP_POLL_SECONDS):
                server: ThreadingHTTPServer = key.data
                if server.fileno() >= 0:  # not closed meanwhile
                    server.handle_request()


class MetricsServer:
    """Serves `render()` at /metrics and liveness at /healthz, from a daemon thread of its own
    or, given a `loop`, from that loop's thread shared with other servers.

    Port 0 picks a free port; `address` says which.
    """

    def __init__(
        self,
        address: str,
        port: int,
        render: Callable[[], str],
        loop: MetricsLoop | None = None,
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    body, content_type = b"ok\n", "text/plain; charset=utf-8"
                elif path == "/metrics":
                    body, content_type = render().encode(), CONTENT_TYPE
                else:
                    self.send_error(404, "this server has /metrics and /healthz")
                    return
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self._server = ThreadingHTTPServer((address, port), Handler)
        self._server.daemon_threads = True
        self._server.timeout = LOOP_POLL_SECONDS  # handle_request never blocks for long
        self._loop = loop
        self._closed = False
        if loop is None:
            thread = threading.Thread(
                target=self._server.serve_forever, name=f"metrics-{port}", daemon=True
            )
            thread.start()
        else:
            loop.add(self._server)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def close(self) -> None:
        """Stop serving; closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._loop is None:
            self._server.shutdown()
        else:
            self._loop.remove(self._server)
        self._server.server_close()

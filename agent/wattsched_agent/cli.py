"""`wattsched agent`: run the node agent for one node (DaemonSet) or every GPU node (simulation).

Modes:
- `--node-name NODE` (default: env NODE_NAME, from the downward API): one node. `--backend nvml`
  drives the GPUs through libnvidia-ml and reads which GPU each pod holds from the kubelet's
  PodResources socket (`--pod-resources-socket`); `--backend simulated` impersonates the GPUs the
  node's labels describe (`nvidia.com/gpu.product`, `nvidia.com/gpu.count`) and allocates them to
  pods as a device plugin would (`simulated_kubelet`).
- `--backend simulated --all-nodes`: one process serving every node labelled
  `nvidia.com/gpu.present=true` (or `--node-selector`; the sandbox's KWOK nodes), one /metrics
  port per node on loopback.
  `--targets-file` writes those ports as a Prometheus file_sd target list.
  `--pod-resources-dir DIR` serves each simulated node's allocation over the real PodResources proto
  on DIR/<node>.sock and reads it back through the same client as on a real node (the sandbox does).

Not for: deciding limits (the operator does) or anything but argument handling and wiring.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

import pynvml
from kubernetes.client.exceptions import ApiException

from wattsched_agent.dcgm_metrics import MetricsLoop, MetricsServer
from wattsched_agent.kube_access import GPU_NODE_SELECTOR, GpuNodeInfo, KubeAccess
from wattsched_agent.node_agent import AgentRunner, ExitPolicy, NodeAgent
from wattsched_agent.nvml_backend import NvmlBackend
from wattsched_agent.podresources import DEFAULT_SOCKET, PodResourcesClient, PodResourcesServer
from wattsched_agent.simulated_kubelet import SimulatedKubelet
from wattsched_agent.simulated_nvml import GpuFaults, SimulatedNvml, load_products
from wattsched_api.commandline import (
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    CommandError,
    CommandParser,
)

DCGM_EXPORTER_PORT = 9400
FAULT_KINDS = {
    "no-permission": GpuFaults(no_permission=True),
    "not-supported": GpuFaults(not_supported=True),
    "set-not-supported": GpuFaults(set_not_supported=True),
    "gpu-lost": GpuFaults(gpu_lost=True),
    "set-ignored": GpuFaults(set_ignored=True),
}

log = logging.getLogger("wattsched_agent")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="wattsched agent",
        description="Apply NodePowerProfile GPU power limits and export DCGM-named metrics.",
    )
    parser.add_argument(
        "--backend",
        choices=["nvml", "simulated"],
        default="nvml",
        help="nvml drives the node's GPUs through libnvidia-ml; simulated impersonates the GPUs "
        "its labels describe (sandbox, tests)",
    )
    parser.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME"),
        help="this node's name (default: env NODE_NAME)",
    )
    parser.add_argument(
        "--all-nodes",
        action="store_true",
        help="simulated backend only: serve every node labelled nvidia.com/gpu.present=true",
    )
    parser.add_argument(
        "--node-selector",
        default=GPU_NODE_SELECTOR,
        help=f"with --all-nodes: the nodes to serve (label selector, default {GPU_NODE_SELECTOR})",
    )
    parser.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig file (default: env KUBECONFIG, else in-cluster configuration)",
    )
    parser.add_argument(
        "--interval-seconds",
        type=float,
        default=10.0,
        help="heartbeat and re-apply interval (limits are lost on a driver reload)",
    )
    parser.add_argument(
        "--metrics-address",
        default=None,
        help="address for /metrics (default 0.0.0.0; 127.0.0.1 with --all-nodes)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DCGM_EXPORTER_PORT,
        help="port for /metrics; with --all-nodes the i-th node gets port+i; 0 picks free ports",
    )
    parser.add_argument(
        "--targets-file",
        type=Path,
        help="write the metrics endpoints as a Prometheus file_sd JSON list",
    )
    parser.add_argument(
        "--shutdown-policy",
        choices=[policy.value for policy in ExitPolicy],
        default=ExitPolicy.LEAVE.value,
        help="on exit, leave the power limits in place (default) or restore the GPUs' defaults",
    )
    parser.add_argument(
        "--pod-resources-socket",
        type=Path,
        default=DEFAULT_SOCKET,
        help=f"nvml backend: the kubelet PodResources socket (default {DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "--pod-resources-dir",
        type=Path,
        help="simulated backend: serve each node's GPU allocation over PodResources on "
        "DIR/<node>.sock and read it from there (default: read it in process)",
    )
    parser.add_argument(
        "--simulated-products",
        type=Path,
        help="product table for the simulated backend (default: the packaged one)",
    )
    parser.add_argument(
        "--simulate-fault",
        action="append",
        default=[],
        metavar="[NODE/]INDEX=KIND",
        help=f"simulated backend: make a GPU fail like NVML; KIND is one of {sorted(FAULT_KINDS)}",
    )
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.all_nodes and args.backend != "simulated":
        parser.error("--all-nodes needs --backend simulated (real GPUs have one agent per node)")
    if not args.all_nodes and not args.node_name:
        parser.error("--node-name (or env NODE_NAME) is required unless --all-nodes is given")
    if args.simulate_fault and args.backend != "simulated":
        parser.error("--simulate-fault needs --backend simulated")
    if args.pod_resources_dir and args.backend != "simulated":
        parser.error("--pod-resources-dir needs --backend simulated (a real node has a kubelet)")
    if args.interval_seconds <= 0:
        parser.error(f"--interval-seconds={args.interval_seconds} must be > 0")
    return args


def parse_faults(specs: list[str], node_names: list[str]) -> dict[str, dict[int, GpuFaults]]:
    """`[NODE/]INDEX=KIND` -> node -> index -> faults (no NODE: every node)."""
    faults: dict[str, dict[int, GpuFaults]] = {}
    for spec in specs:
        where, _, kind = spec.partition("=")
        node, _, index_text = where.rpartition("/")
        if kind not in FAULT_KINDS or not index_text.isdigit():
            raise ValueError(
                f"--simulate-fault {spec!r}: expected [NODE/]INDEX=KIND with KIND one of "
                f"{sorted(FAULT_KINDS)}"
            )
        for name in [node] if node else node_names:
            faults.setdefault(name, {})[int(index_text)] = FAULT_KINDS[kind]
    return faults


def build_agents(
    args: argparse.Namespace, kube: KubeAccess, servers: list[PodResourcesServer]
) -> dict[str, NodeAgent]:
    """The node agents; simulated nodes' PodResources servers (if any) are appended to `servers`."""
    if args.backend == "nvml":
        # The API server answers and the node exists: fail at start, in one line, rather than
        # retry forever against a wrong kubeconfig or node name.
        kube.read_node(args.node_name)
        client = PodResourcesClient(args.pod_resources_socket)
        return {args.node_name: NodeAgent(args.node_name, NvmlBackend(pynvml, "nvml"), client)}
    nodes: list[GpuNodeInfo] = (
        kube.gpu_nodes(None, args.node_selector)
        if args.all_nodes
        else kube.gpu_nodes(args.node_name)
    )
    catalogue = load_products(args.simulated_products)
    faults = parse_faults(args.simulate_fault, [node.name for node in nodes])
    agents: dict[str, NodeAgent] = {}
    for node in nodes:
        try:
            library = SimulatedNvml(
                node.name,
                [node.product] * node.gpu_count,
                catalogue=catalogue,
                faults=faults.get(node.name),
            )
        except ValueError as error:
            if not args.all_nodes:
                raise
            # One node the table cannot impersonate must not stop the simulation of the others.
            log.warning("not serving %s", error)
            continue
        kubelet = SimulatedKubelet()
        devices: SimulatedKubelet | PodResourcesClient = kubelet
        if args.pod_resources_dir is not None:
            server = PodResourcesServer(
                args.pod_resources_dir / f"{node.name}.sock", kubelet.list_gpu_pods
            )
            server.start()
            servers.append(server)
            devices = PodResourcesClient(server.socket_path)
        agents[node.name] = NodeAgent(
            node.name, NvmlBackend(library, "simulated"), devices, library, kubelet
        )
    return agents


def serve_metrics(
    agents: Mapping[str, NodeAgent], address: str, port: int, targets_file: Path | None
) -> dict[str, MetricsServer]:
    """One /metrics server per node (port 0: free ports; else port, port+1, ... by node name),
    all served from one thread (`MetricsLoop`).

    `targets_file` receives the endpoints as a Prometheus file_sd list (written atomically).
    """
    servers: dict[str, MetricsServer] = {}
    loop = MetricsLoop()
    for offset, (name, agent) in enumerate(sorted(agents.items())):
        servers[name] = MetricsServer(
            address, 0 if port == 0 else port + offset, agent.metrics_text, loop
        )
    if targets_file is not None:
        targets = [
            {"targets": [server.address], "labels": {"wattsched_node": name}}
            for name, server in servers.items()
        ]
        temporary = targets_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(targets, indent=2))
        temporary.replace(targets_file)
    return servers


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    kube = KubeAccess(args.kubeconfig)
    pod_resources_servers: list[PodResourcesServer] = []
    try:
        agents = build_agents(args, kube, pod_resources_servers)
    except ApiException as error:
        if error.status == 404 and args.node_name and not args.all_nodes:
            raise CommandError(
                f"node {args.node_name} not found: --node-name (or env NODE_NAME) must name a "
                "node of the cluster (`kubectl get nodes`)",
                EXIT_NOT_FOUND,
            ) from None
        raise
    except ValueError as error:
        for pod_resources in pod_resources_servers:
            pod_resources.stop()
        print(f"wattsched agent: {error}", file=sys.stderr)
        return EXIT_USAGE
    address = args.metrics_address or ("127.0.0.1" if args.all_nodes else "0.0.0.0")
    servers = serve_metrics(agents, address, args.metrics_port, args.targets_file)
    for name, server in servers.items():
        log.info(
            "node %s: %s backend, metrics on http://%s/metrics", name, args.backend, server.address
        )
    runner = AgentRunner(
        kube,
        agents,
        single_node=None if args.all_nodes else args.node_name,
        interval_seconds=args.interval_seconds,
        exit_policy=ExitPolicy(args.shutdown_policy),
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping (shutdown policy: %s)", signum, args.shutdown_policy)
        runner.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    runner.run()
    for server in servers.values():  # the last one stops their shared loop
        server.close()
    for pod_resources in pod_resources_servers:
        pod_resources.stop()
    return 0

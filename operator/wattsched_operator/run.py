"""`wattsched operator`: run the kopf operator with the planning loop, metrics and health probe.

Parses the command line, builds the cache, the Kubernetes client, the metrics and the planning
loop, and hands the handlers in `handlers` to `kopf.run`. With peering (the default) only the
operator with the highest priority among live peers plans and applies; `--standalone` skips
peering for development. Not for the logic of planning or applying (`loop`, `desired`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import kopf

from wattsched_api.commandline import EXIT_NOT_FOUND, CommandError, CommandParser
from wattsched_operator import handlers
from wattsched_operator.allocator import limit_malloc_arenas
from wattsched_operator.budget_horizon import DEFAULT_HORIZON_HOURS
from wattsched_operator.cache import PODS, WORKLOADS, ClusterCache
from wattsched_operator.core import build_input_function
from wattsched_operator.desired import LABEL_WORKLOAD
from wattsched_operator.kube import (
    GROUP_PATH,
    LIST_PAGE_SIZE,
    Kube,
    KubeError,
    decode_any_stored_object,
)
from wattsched_operator.loop import LoopSettings, PlanningLoop
from wattsched_operator.metrics import OperatorMetrics
from wattsched_operator.rounds import HEARTBEAT_TIMEOUT_SECONDS
from wattsched_operator.telemetry import (
    DEFAULT_PEAK_TOKEN_QUERY,
    DEFAULT_QUEUE_QUERY,
    DEFAULT_TOKEN_QUERY,
    TelemetryConfig,
    TelemetryReader,
)
from wattsched_operator.watch import Watch, handled_by
from wattsched_optimizer.model import read_catalogue_file, use_catalogue
from wattsched_optimizer.planner import plan

logger = logging.getLogger("wattsched.operator")

PEERING_PATH = "/apis/kopf.dev/v1/clusterkopfpeerings"
PEER_DEFAULT_LIFETIME_SECONDS = 60
# How long a silent peer keeps its rank: the time another replica takes over after a crash.
PEER_LIFETIME_SECONDS = 15
# How long kopf's per-object worker waits for the object's next event before it exits.
KOPF_WORKER_IDLE_SECONDS = 0.5
# The longest --horizon-hours (as `wattsched plan --horizon-hours`).
MAX_HORIZON_HOURS = 168


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="wattsched operator",
        description="Run the wattsched operator: plan LLMWorkloads under EnergyBudgets and apply "
        "the plans as pods and NodePowerProfiles.",
    )
    parser.add_argument(
        "--standalone", action="store_true", help="run without peering (development)"
    )
    parser.add_argument(
        "--peering",
        default="wattsched",
        help="name of the ClusterKopfPeering object shared by operator replicas "
        "(created if missing; needs charts/wattsched/crds/kopf.dev_clusterkopfpeerings.yaml)",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority (default: random, so two replicas never tie)",
    )
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="handle LLMWorkloads only in this namespace (repeatable; default: all)",
    )
    parser.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig file (default: env KUBECONFIG; in a pod, the in-cluster configuration)",
    )
    parser.add_argument(
        "--debounce-seconds",
        type=float,
        default=1.0,
        help="wait this long after a change for more before planning (one plan for a burst)",
    )
    parser.add_argument(
        "--replan-seconds",
        "--replan-interval-seconds",
        dest="replan_seconds",
        type=float,
        default=60.0,
        help="periodic re-plan (telemetry, deadlines) even without changes",
    )
    parser.add_argument(
        "--heartbeat-timeout-seconds",
        type=float,
        default=HEARTBEAT_TIMEOUT_SECONDS,
        help="an agent silent for longer is lost: its node counts at maximum power and takes no "
        "work, and a re-plan moves the replicas there (agents report every 10 s by default)",
    )
    parser.add_argument(
        "--horizon-hours",
        type=float,
        default=DEFAULT_HORIZON_HOURS,
        help="hours the plan looks ahead for EnergyBudgets with an allowance, a cap schedule or "
        "a carbon forecast (hourly slots; flexible work may wait for cleaner hours or the next "
        "period); 0 plans one instant at a time",
    )
    parser.add_argument(
        "--confirm-timeout-seconds",
        type=float,
        default=15.0,
        help="how long to wait for agents to confirm lowered limits",
    )
    parser.add_argument("--backoff-limit", type=int, default=3, help="retries of failed replicas")
    parser.add_argument(
        "--backoff-seconds",
        type=float,
        default=10.0,
        help="wait before retrying a failed replica (doubles with each retry, at most 5 min)",
    )
    parser.add_argument(
        "--prometheus-url",
        default=os.environ.get("WATTSCHED_PROMETHEUS_URL"),
        help="Prometheus with DCGM/Kepler metrics: statuses then show measured power "
        "(optional; without it every figure is modelled)",
    )
    parser.add_argument(
        "--telemetry-window-seconds",
        type=int,
        default=60,
        help="rate()/avg_over_time() window of the power queries (at least four scrapes)",
    )
    parser.add_argument(
        "--tokens-query",
        default=DEFAULT_TOKEN_QUERY,
        help="PromQL for generated tokens/s by (namespace, pod); {window} is replaced by the rate "
        "window (default: vLLM's vllm:generation_tokens_total; empty: no token figures). Feeds "
        "tokens/J and the Inference throughput calibration",
    )
    parser.add_argument(
        "--peak-tokens-query",
        default=DEFAULT_PEAK_TOKEN_QUERY,
        help="PromQL for each pod's highest short-window tokens/s within the rate window, by "
        "(namespace, pod); {window} as above (default: the highest 30-s rate of "
        "vllm:generation_tokens_total at 15-s steps; empty: the tokens query's mean). Sizes "
        "Inference services",
    )
    parser.add_argument(
        "--queue-query",
        default=DEFAULT_QUEUE_QUERY,
        help="PromQL for the tokens waiting in each pod's queue by (namespace, pod); {window} as "
        "above (default: vLLM's vllm:num_requests_waiting times its generation tokens per "
        "finished request; empty: no queue figures). Services are sized for their backlog too",
    )
    parser.add_argument(
        "--accounting-seconds",
        type=float,
        default=60.0,
        help="how often energy, carbon and measured figures in statuses are brought up to date, "
        "between plans too (each time is one status write per running workload)",
    )
    parser.add_argument(
        "--demand-check-seconds",
        type=float,
        default=15.0,
        help="with --prometheus-url, how often the services' tokens/s and queues are read between "
        "plans; a service whose demand exceeds its plan's capacity is re-planned then (0: never)",
    )
    parser.add_argument("--metrics-port", type=int, default=8080, help="0 disables /metrics")
    parser.add_argument("--health-port", type=int, default=8081, help="0 disables /healthz")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        help="the operator's log level",
    )
    parser.add_argument(
        "--catalogue-file",
        type=Path,
        help="YAML with extra GPU products for the performance model (catalogue.yaml's shape: "
        "sources, products, optionally unknown_product); the chart's operator.catalogue",
    )
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if not 0 < args.heartbeat_timeout_seconds < float("inf"):
        parser.error(
            f"--heartbeat-timeout-seconds={args.heartbeat_timeout_seconds:g}: must be a positive "
            "number of seconds (default 30; agents report every 10 s)"
        )
    if not 0 <= args.horizon_hours <= MAX_HORIZON_HOURS:
        parser.error(
            f"--horizon-hours={args.horizon_hours:g}: must be from 0 (one instant at a time) to "
            f"{MAX_HORIZON_HOURS} (a week)"
        )
    if not 0 <= args.demand_check_seconds < float("inf"):
        parser.error(
            f"--demand-check-seconds={args.demand_check_seconds:g}: must be a number of seconds "
            ">= 0 (default 15; 0: no checks between plans)"
        )
    try:
        args.catalogue = read_catalogue_file(args.catalogue_file)
    except ValueError as error:
        parser.error(str(error))
    if args.tokens_query != DEFAULT_TOKEN_QUERY and not args.prometheus_url:
        parser.error("--tokens-query needs --prometheus-url (the query runs on that Prometheus)")
    if args.peak_tokens_query != DEFAULT_PEAK_TOKEN_QUERY and not args.prometheus_url:
        parser.error(
            "--peak-tokens-query needs --prometheus-url (the query runs on that Prometheus)"
        )
    if args.queue_query != DEFAULT_QUEUE_QUERY and not args.prometheus_url:
        parser.error("--queue-query needs --prometheus-url (the query runs on that Prometheus)")
    try:
        telemetry_config(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def telemetry_config(args: argparse.Namespace) -> TelemetryConfig | None:
    """The telemetry settings from the command line; None without --prometheus-url."""
    if not args.prometheus_url:
        return None
    return TelemetryConfig(
        prometheus_url=args.prometheus_url,
        rate_window_seconds=args.telemetry_window_seconds,
        token_query=args.tokens_query,
        peak_token_query=args.peak_tokens_query,
        queue_query=args.queue_query,
    )


def is_live(peer: dict[str, Any], now: datetime) -> bool:
    """Whether a kopf peering record is still fresh (kopf's own rule: lastseen + lifetime)."""
    try:
        seen = datetime.fromisoformat(str(peer["lastseen"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return False
    if seen.tzinfo is None:
        seen = seen.replace(tzinfo=UTC)
    lifetime = float(peer.get("lifetime") or PEER_DEFAULT_LIFETIME_SECONDS)
    return (now - seen).total_seconds() < lifetime


def leads(peers: dict[str, Any], identity: str, priority: int, now: datetime) -> bool:
    """Whether `identity` is registered and outranks every other live peer."""
    if identity not in peers:
        return False
    others = [
        p for name, p in peers.items() if name != identity and p is not None and is_live(p, now)
    ]
    return all(int(p.get("priority") or 0) < priority for p in others)


def check_cluster(kube: Kube) -> None:
    """Fail early, in one line, where the operator could not work: the API server unreachable
    (the client's own error, reported by the CLI) or the wattsched CRDs not installed."""
    try:
        kube.get(GROUP_PATH)
    except KubeError as error:
        if error.status == 404:
            raise CommandError(
                "the wattsched CRDs (wattsched.io/v1alpha1) are not installed in this cluster: "
                "kubectl apply -f crds/, or install the chart charts/wattsched",
                EXIT_NOT_FOUND,
            ) from None
        raise


def ensure_peering(kube: Kube, name: str, path: str = PEERING_PATH) -> None:
    """Create the ClusterKopfPeering `name` unless it exists; one line naming the CRD to install
    where kopf's peering CRD is missing. `path`: the collection (kopf's, but for tests)."""
    try:
        kube.create(
            path,
            {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}},
        )
    except KubeError as error:
        if error.status == 404:
            raise CommandError(
                "kopf's peering CRD (clusterkopfpeerings.kopf.dev) is not installed: install the "
                "chart charts/wattsched, or kubectl apply -f "
                "charts/wattsched/crds/kopf.dev_clusterkopfpeerings.yaml, or run one replica "
                "with --standalone",
                EXIT_NOT_FOUND,
            ) from None
        if error.status != 409:
            raise


def own_watches(
    kube: Kube, state: handlers.OperatorMemo, loop: asyncio.AbstractEventLoop
) -> list[Watch]:
    """The operator's own watches: every LLMWorkload, and every pod labelled with its workload
    (cluster-wide, as kopf's; the handlers drop what is outside --namespace)."""
    return [
        Watch(
            kube=kube,
            kind=WORKLOADS,
            path=f"{GROUP_PATH}/llmworkloads",
            deliver=handled_by(handlers.workload_event, state),
            loop=loop,
        ),
        Watch(
            kube=kube,
            kind=PODS,
            path="/api/v1/pods",
            deliver=handled_by(handlers.pod_event, state),
            loop=loop,
            label_selector=LABEL_WORKLOAD,
        ),
    ]


def main(argv: list[str]) -> int:
    # Before any thread starts: each would take a malloc arena of its own (`allocator`).
    limit_malloc_arenas()
    args = parse_args(argv)
    use_catalogue(args.catalogue)
    # Before kopf starts: its watches must decode any object the API server stores (the models
    # then refuse LLMWorkload templates deeper than MAX_TEMPLATE_DEPTH).
    decode_any_stored_object()
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # kopf logs every handler call at INFO; the handlers only record events, so keep it quiet.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kube = Kube(args.kubeconfig)
    check_cluster(kube)
    if not args.standalone:
        ensure_peering(kube, args.peering)
    cache = ClusterCache()
    metrics = OperatorMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    identity = os.environ.get("WATTSCHED_POD_NAME") or f"{socket.gethostname()}/{os.getpid()}"
    priority = args.priority if args.priority is not None else random.randint(1, 1_000_000)

    async def am_leader() -> bool:
        if args.standalone:
            return True
        try:
            body = await asyncio.to_thread(kube.get, f"{PEERING_PATH}/{args.peering}")
        except KubeError as error:
            if error.status == 404:
                return False  # no peering object: nobody may act until it exists again
            raise
        return leads(body.get("status") or {}, identity, priority, datetime.now(UTC))

    loop_settings = LoopSettings(
        debounce_seconds=args.debounce_seconds,
        replan_seconds=args.replan_seconds,
        confirm_timeout_seconds=args.confirm_timeout_seconds,
        backoff_limit=args.backoff_limit,
        backoff_seconds=args.backoff_seconds,
        namespaces=tuple(args.namespace),
        accounting_seconds=args.accounting_seconds,
        heartbeat_timeout_seconds=args.heartbeat_timeout_seconds,
        horizon_hours=args.horizon_hours,
        demand_check_seconds=args.demand_check_seconds,
    )
    build_input = build_input_function(args.heartbeat_timeout_seconds)
    config = telemetry_config(args)
    telemetry = TelemetryReader(config) if config is not None else None

    @kopf.on.startup()
    async def start_loop(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
        # No change handlers, so no diff base: kopf's default would still build one (and look
        # for a stored one) on every watch event.
        settings.persistence.diffbase_storage = kopf.MultiDiffBaseStorage([])
        settings.posting.level = logging.WARNING
        # kopf's initial listings in pages too: one unpaged list of 10,000 workloads is tens of
        # megabytes of JSON, kept (text and parsed) while its objects are dispatched.
        settings.watching.chunk_size = LIST_PAGE_SIZE
        # kopf's worker for an object keeps its last watch event (the whole parsed body, managed
        # fields and all: ~32 KB for an LLMWorkload) until it has been idle this long; with the
        # default 5 s, listing 10,000 objects kept thousands of them at once. The handlers only
        # record the event in the cache, so a worker has nothing to wait for.
        settings.queueing.idle_timeout = KOPF_WORKER_IDLE_SECONDS
        settings.peering.lifetime = PEER_LIFETIME_SECONDS
        loop = PlanningLoop(
            cache=cache,
            kube=kube,
            settings=loop_settings,
            build_input=build_input,
            plan_function=plan,
            metrics=metrics,
            is_leader=am_leader,
            telemetry=telemetry,
        )
        memo.task = asyncio.create_task(loop.run(), name="wattsched planning loop")
        # LLMWorkloads and the operator's pods grow with the workloads: the operator watches them
        # itself, one compact body at a time (`watch`), not through kopf.
        memo.watches = own_watches(kube, memo.state, asyncio.get_running_loop())
        for watch in memo.watches:
            watch.start()

    @kopf.on.cleanup()
    async def stop_loop(memo: Any, **_: Any) -> None:
        for watch in getattr(memo, "watches", ()):
            watch.stop()
        task = getattr(memo, "task", None)
        if task is not None:
            task.cancel()
            # The loop writes the statuses still pending before it ends (`flush_seconds`).
            await asyncio.gather(task, return_exceptions=True)

    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    logger.info("wattsched operator %s (priority %d) starting", identity, priority)
    kopf.run(
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=priority,
        identity=cast(Any, identity),  # kopf's Identity is a NewType of str
        # Cluster-wide watches (nodes, profiles and budgets are cluster-scoped, and peering is
        # one ClusterKopfPeering); the handlers drop workloads and pods outside --namespace.
        clusterwide=True,
        liveness_endpoint=liveness,
        memo=kopf.Memo(
            state=handlers.OperatorMemo(
                cache=cache, kube=kube, namespaces=frozenset(args.namespace)
            )
        ),
    )
    return 0

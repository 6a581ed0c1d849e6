"""wattsched and the oracle as simulator policies: the operator's decision core, simulated cluster.

`wattsched` is what the operator decides, by the operator's code: each round calls
`wattsched_operator.core.decide` (snapshot, demand forecast, calibration, optimizer, desired pods
and power-limit steps, progress and statuses) on the simulated cluster as the operator's cache
shows it and the telemetry its reader returns (`observed`). What stays here is the part of the
shell and of Kubernetes a simulation needs: the objects the round writes (pods created, evicted
and deleted, NodePowerProfiles, status merge patches) are kept as a Kubernetes API server would
keep them; a created pod binds to its node when the node has the GPUs free (kube-scheduler; it
stays Pending otherwise); a round that leaves work for the next (`replan_soon`: paced moves, a
pod name still held) is followed at once by another, as the operator's loop does after its
debounce; and the bound pods with their profiles' limits are the engine's `Decision`.

The core's make-before-break moves (`wattsched_operator.handover`) play out here as on a
cluster: the round creates the replacement (`<pod>-h`) and keeps the old pod bound at its limit,
so the engine runs both; a later round sees the replacement Ready (the engine's start-up) and
evicts the old pod. The old pod goes at the first round after that, not at the moment the
replacement is Ready (the operator replans on the pod's Ready event). Where the core moves
break-before-make, the engine's own hand-over (`engine.Simulation._hand_over`) may still keep
the removed replica serving while GPUs and budgets allow, which is kinder than the operator.

`oracle` goes through the same core with what no real system has: each service declares the
future demand over the next interval (the highest latency-window average) plus its current true
backlog, with no readings to override it; each job's `status.progress` is its true progress; and
the ground truth is the performance model (an injected plan function). It is a reference point,
not a policy one could deploy, and not a proven lower bound on energy.
Not for: baselines (`baselines`) or physics (`engine`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from wattsched_api.meta import format_time, merge_patch
from wattsched_api.vocabulary import GPU_RESOURCE, PodPhase, Source
from wattsched_operator import core, desired
from wattsched_operator import demand as demand_forecast
from wattsched_operator.readings import PodKey, TelemetrySnapshot
from wattsched_operator.transition import NodeLimits
from wattsched_optimizer import planner
from wattsched_optimizer.model import PerformanceModel, sm_clock_effect
from wattsched_optimizer.problem import EnergyPolicy, Plan, PlanInput, PlanOptions, WorkloadType

from . import observed
from .engine import Decision, RunningReplica, View
from .truth import GroundTruth
from .workloads import ServiceSpec

# Rounds run back to back at most this many times when each leaves work for the next.
MAX_FOLLOW_UP_ROUNDS = 3
Body = dict[str, Any]


@dataclass(frozen=True)
class TruthModel:
    """The ground truth behind the optimizer's `PerformanceModel` interface (oracle only)."""

    truth: GroundTruth
    # Optimizer product name -> ground-truth product name, from the scenario's nodes.
    products: Mapping[str, str]

    def throughput_tokens_per_second(  # noqa: PLR0917 (PerformanceModel's signature)
        self,
        product: str,
        workload_type: WorkloadType,
        params_billions: float,
        gpus: int,
        relative_throughput: float,
        power_limit_watts: float,
        *,
        sm_clock_mhz: int | None = None,
    ) -> float:
        # A locked clock: the true unlocked maximum times the catalogue's clock share, as the
        # planner assumes the lock fits under the limit (the oracle knows the work, not clocks).
        full = self.truth.replica_tokens_per_second(
            product=self.products[product],
            workload_type=workload_type,
            model_parameters_billions=params_billions,
            gpus=gpus,
            relative_throughput=relative_throughput,
            power_limit_watts=power_limit_watts
            if sm_clock_mhz is None
            else self.truth.product(self.products[product]).max_watts,
        )
        return full * sm_clock_effect(product, workload_type, sm_clock_mhz)[0]

    def expected_power_watts(
        self, product: str, workload_type: WorkloadType, power_limit_watts: float
    ) -> float:
        full = self.truth.full_load_watts(self.products[product], workload_type)
        return min(power_limit_watts, full)

    def idle_power_watts(self, product: str) -> float:
        return self.truth.product(self.products[product]).idle_watts


@dataclass(frozen=True)
class OracleKnowledge:
    """What only the oracle knows: the truth and the whole future of demand."""

    truth: GroundTruth


@dataclass
class PlannerPolicy:
    name: str
    options: PlanOptions = field(default_factory=PlanOptions)
    energy_policy: EnergyPolicy = EnergyPolicy.BALANCED
    oracle: OracleKnowledge | None = None
    # The demand forecast's headroom: the operator's, unless a what-if changes it.
    headroom: float = demand_forecast.HEADROOM
    # Ablation: offer the planner only each workload's highest-quality variant.
    best_variant_only: bool = False
    settings: core.Settings = field(default_factory=core.Settings)
    # The scenario's hourly carbon curve is the budgets' forecast (`spec.carbon`'s forecast
    # query, answered from the curve as Prometheus would), so the horizon plans with it.
    carbon_forecast: bool = False
    # The controller's memory, from the first decision on (`core.fresh_memory`: the scenario's
    # re-plan interval is the operator's --replan-seconds), and what the API server holds: pods
    # (bound or Pending), status subresources by (kind, key), NodePowerProfile limits by node.
    _memory: core.Memory = field(init=False)
    _pods: dict[PodKey, Body] = field(default_factory=dict)
    _statuses: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    _limits: dict[str, NodeLimits] = field(default_factory=dict)
    _warm: bool = field(default=False, init=False)

    # -- the cluster as the operator's cache shows it -------------------------------------------

    def _declared_tokens_per_second(self, view: View, service: ServiceSpec) -> float:
        """What the service's spec.slo.tokensPerSecond says: its mean demand over the run (what
        a user declares from past traffic), or for the oracle the future demand."""
        if self.oracle is None:
            return service.trace.mean_tokens_per_second
        scenario = view.scenario
        steps = scenario.step_seconds
        window = max(1, round(scenario.latency_target_seconds / steps))
        start = round(view.now_seconds / steps)
        horizon = round((scenario.replan_interval_seconds + scenario.startup_seconds) / steps)
        future = service.trace.demand_tokens[start : start + horizon + window]
        if len(future) == 0:
            return 0.0
        sums = (
            np.convolve(future, np.ones(window), mode="valid") if len(future) >= window else future
        )
        peak = float(sums.max()) / (window * steps)
        backlog = view.true_backlog_tokens.get(service.key, 0.0)
        return peak + backlog / scenario.replan_interval_seconds

    def _sync_pods(self, view: View) -> dict[PodKey, RunningReplica]:
        """Match the engine's replicas to the bound pods (by workload, node and variant, as the
        engine matched the last decision); a bound pod with no replica is gone (its job
        finished). Returns each bound pod's replica."""
        free: dict[tuple[str, str, str], list[RunningReplica]] = {}
        for replica in view.replicas:
            free.setdefault((replica.workload, replica.node, replica.variant), []).append(replica)
        matched: dict[PodKey, RunningReplica] = {}
        for key, pod in sorted(self._pods.items()):
            node = pod["spec"].get("nodeName")
            if not node:
                continue
            meta = pod["metadata"]
            workload = f"{meta['namespace']}/{meta['labels'][desired.LABEL_WORKLOAD]}"
            candidates = free.get((workload, node, meta["annotations"][desired.ANNOTATION_VARIANT]))
            if not candidates:
                del self._pods[key]
                continue
            matched[key] = candidates.pop(0)
        return matched

    def _pod_bodies(self, view: View, matched: Mapping[PodKey, RunningReplica]) -> dict[str, Body]:
        startup = view.scenario.startup_seconds
        bodies: dict[str, Body] = {}
        for key, pod in self._pods.items():
            body = copy.deepcopy(pod)
            replica = matched.get(key)
            if replica is None:
                body["status"] = {"phase": PodPhase.PENDING}
            else:
                ready = replica.ready_at_seconds <= view.now_seconds
                started = min(replica.ready_at_seconds - startup, view.now_seconds)
                body["status"] = {
                    "phase": PodPhase.RUNNING,
                    "startTime": format_time(observed.at(started)),
                    "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                }
            bodies[f"{key[0]}/{key[1]}"] = body
        return bodies

    def observe(self, view: View) -> tuple[core.ClusterView, dict[PodKey, RunningReplica]]:
        scenario = view.scenario
        matched = self._sync_pods(view)
        workloads: dict[str, Body] = {}
        for service in scenario.services:
            body = observed.service_body(
                service, self.energy_policy, self._declared_tokens_per_second(view, service)
            )
            workloads[service.key] = body
        for job in view.jobs:
            workloads[job.key] = observed.job_body(job, self.energy_policy, None)
        if self.oracle is not None:
            for job in view.jobs:
                done = job.work_tokens - view.true_remaining_tokens.get(job.key, job.work_tokens)
                status = self._statuses.setdefault(("LLMWorkload", job.key), {})
                status["progress"] = {
                    "completedTokens": done,
                    "totalTokens": job.work_tokens,
                    "source": Source.MEASURED,
                    "updatedAt": format_time(observed.at(view.now_seconds)),
                }
        live = set(workloads)
        self._statuses = {
            k: v for k, v in self._statuses.items() if k[0] != "LLMWorkload" or k[1] in live
        }
        for key, body in workloads.items():
            body["status"] = copy.deepcopy(self._statuses.get(("LLMWorkload", key), {}))
        budgets = {}
        for budget in scenario.budgets:
            body = observed.budget_body(budget)
            if self.carbon_forecast:
                body["spec"]["carbon"] = {
                    "intensityGramsPerKilowattHour": scenario.carbon.grams_per_kwh_at(
                        view.now_seconds
                    ),
                    "forecastPrometheusQuery": observed.CARBON_FORECAST_QUERY,
                }
            body["status"] = copy.deepcopy(self._statuses.get(("EnergyBudget", budget.name), {}))
            budgets[budget.name] = body
        now = observed.at(view.now_seconds)
        return (
            core.ClusterView(
                workloads=workloads,
                budgets=budgets,
                nodes={n.name: observed.node_body(n) for n in scenario.nodes},
                profiles={
                    n.name: observed.profile_body(n.name, self._limits.get(n.name), now)
                    for n in scenario.nodes
                },
                pods=self._pod_bodies(view, matched),
            ),
            matched,
        )

    def _snapshot(
        self, view: View, matched: Mapping[PodKey, RunningReplica]
    ) -> TelemetrySnapshot | None:
        """What the operator's snapshot queries return: the pods' tokens/s, watts and queues."""
        return observed.telemetry_reading(
            view.telemetry.visible(view.now_seconds),
            [
                observed.PodReplica(key, replica.workload, replica.gpus, replica.ready_at_seconds)
                for key, replica in matched.items()
            ],
            scrape_interval_seconds=view.scenario.telemetry.scrape_interval_seconds,
            draining=Counter(r.workload for r in view.draining),
        )

    def _readings(
        self,
        view: View,
        cluster: core.ClusterView,
        matched: Mapping[PodKey, RunningReplica],
        now_observed: core.Observed,
    ) -> core.Readings | None:
        """What the operator's telemetry reader returns for a round: the snapshot, the energy of
        the nodes that accounting finds due (their energy counters), each due job's progress
        counter and the budgets' carbon forecasts (the oracle reads nothing: its inputs are in the
        objects)."""
        if self.oracle is not None:
            return None
        now = observed.at(view.now_seconds)
        visible = view.telemetry.visible(view.now_seconds)
        requests = core.telemetry_requests(now_observed, now)
        return core.Readings(
            snapshot=self._snapshot(view, matched),
            energy={
                start: observed.energy_reading(visible, nodes, start=start, end=requests.end)
                for start, (nodes, _pods) in requests.energy.items()
            }
            if requests.end is not None
            else {},
            progress={
                key: observed.progress_counter(visible, key) for key in requests.progress_queries
            },
            rate_window_seconds=observed.RATE_WINDOW_SECONDS,
            carbon_forecasts={
                name: observed.carbon_forecast(
                    view.scenario.forecast_carbon,
                    view.now_seconds,
                    self.settings.horizon_hours,
                )
                for name in requests.forecast_queries
            },
        )

    # -- a round, applied as the API server and kube-scheduler would ------------------------------

    def _apply(self, round_: core.Round, now: datetime) -> None:
        for write in (*round_.early_statuses, *round_.moving, *round_.budget_statuses):
            self._write_status(write)
        for status in round_.workload_statuses:
            if status.write is not None:
                self._write_status(status.write)
        for limits in (round_.lower, round_.raise_):
            self._limits.update(limits)
        for eviction in round_.evict:
            self._pods.pop((eviction.namespace, eviction.name), None)
        for deletion in round_.delete:
            self._pods.pop((deletion.namespace, deletion.name), None)
        for (namespace, name), watts in round_.relabel.items():
            kept = self._pods.get((namespace, name))
            if kept is not None:
                kept["metadata"]["annotations"][desired.ANNOTATION_POWER_LIMIT] = watts
        for created in round_.create:
            body = copy.deepcopy(dict(created))
            # As the API server stamps it (a make-before-break replacement not Ready in time is
            # given up, counted from it).
            body["metadata"]["creationTimestamp"] = format_time(now)
            self._pods[(body["metadata"]["namespace"], body["metadata"]["name"])] = body

    def _write_status(self, write: core.StatusWrite) -> None:
        ref = write.object
        key = ref.name if ref.namespace is None else f"{ref.namespace}/{ref.name}"
        store = (ref.kind, key)
        self._statuses[store] = merge_patch(
            self._statuses.get(store, {}), copy.deepcopy(write.status)
        )

    def _bind(self, view: View) -> None:
        """kube-scheduler: a Pending pod binds to its nodeSelector's node when its GPUs are free."""
        capacity = {n.name: n.gpu_count for n in view.scenario.nodes}
        used: Counter[str] = Counter()
        pending = []
        for _, pod in sorted(self._pods.items()):
            node = pod["spec"].get("nodeName")
            if node:
                used[node] += _gpus(pod)
            else:
                pending.append(pod)
        for pod in pending:
            node = pod["spec"]["nodeSelector"][desired.HOSTNAME_LABEL]
            if used[node] + _gpus(pod) <= capacity.get(node, 0):
                pod["spec"]["nodeName"] = node
                used[node] += _gpus(pod)

    def _plan_function(self, view: View) -> core.PlanFunction:
        """The optimizer, as the operator calls it; for the oracle with the ground truth as its
        model (in place of the calibrated catalogue), and for the ablation with each workload's
        highest-quality variant only."""
        products = {node.planner_product: node.truth_product for node in view.scenario.nodes}
        truth = None if self.oracle is None else TruthModel(self.oracle.truth, products)
        best_only = self.best_variant_only

        def plan(plan_input: PlanInput, model: PerformanceModel) -> Plan:
            if best_only:
                plan_input = _best_variants_only(plan_input)
            return planner.plan(plan_input, model=truth or model)

        return plan

    def _warm_start(self, view: View) -> None:
        """The controller's memory at the first decision. The run starts on a cluster that has
        been serving (`engine`): an operator that had been running holds the readings it took
        of the services' pods before t = 0 in its demand history. They are the telemetry's
        samples from before t = 0 (`engine`'s prefill, which the baselines' autoscalers read
        too), each recorded when it became visible, with its served tokens/s (a 15-s window's,
        as the operator's peak query reads) and queue."""
        if self._warm:
            return
        self._warm = True
        self._memory = core.fresh_memory(view.scenario.replan_interval_seconds, self.headroom)
        if self.oracle is not None:
            return
        delay = view.scenario.telemetry.delay_seconds
        for sample in view.telemetry.visible(view.now_seconds):
            if sample.window_end_seconds > 0:
                continue
            for key, served in sample.served_tokens_per_second.items():
                self._memory.demand.record(
                    key,
                    sample.window_end_seconds + delay,
                    served,
                    backlog_tokens=sample.backlog_tokens.get(key, 0.0),
                )

    def decide(self, view: View) -> Decision:
        started = time.perf_counter()
        self._warm_start(view)
        now = observed.at(view.now_seconds)
        status = "no round"
        handovers = 0
        for _ in range(MAX_FOLLOW_UP_ROUNDS):
            cluster, matched = self.observe(view)
            before = core.Observed(
                view=cluster,
                memory=self._memory,
                monotonic=view.now_seconds,
                settings=self.settings,
            )
            readings = self._readings(view, cluster, matched, before)
            round_ = core.decide(
                core.Observed(
                    view=cluster,
                    memory=self._memory,
                    monotonic=view.now_seconds,
                    settings=self.settings,
                    telemetry=readings,
                ),
                now,
                plan_function=self._plan_function(view),
            )
            self._apply(round_, now)
            handovers += sum(map(len, round_.disruptions.handovers.started.values()))
            created = {core.pod_workload_key(pod) for pod in round_.create}
            self._memory = core.after_apply(
                round_,
                core.Applied(
                    evicted=tuple((e.namespace, e.name) for e in round_.evict),
                    accepted=frozenset(created),
                ),
                view=cluster,
                monotonic=view.now_seconds,
                settings=self.settings,
            )
            if round_.plan is not None:
                status = str(round_.plan.status)
            self._bind(view)
            if not round_.replan_soon:
                break
        return dataclasses.replace(
            observed.decision_from_pods(
                self.running_pods(view),
                self._limits,
                plan_seconds=time.perf_counter() - started,
                status=status,
                handovers=handovers,
            ),
            check_interval_seconds=None
            if self.oracle is not None
            else view.scenario.telemetry.scrape_interval_seconds,
        )

    def check(self, view: View) -> bool:
        """Between decisions, as the operator's loop does every scrape interval: the services'
        served tokens/s and queues as telemetry shows them now, folded into the demand history
        by `core.check_demand`; True when it asks for a re-plan now. As the operator's loop
        (`check_demand_once`), it reads only the snapshot: preparing a round's telemetry requests
        here, as it once did, was two thirds of a 48-hour run's time."""
        cluster, matched = self.observe(view)
        round_ = core.check_demand(
            core.Observed(
                view=cluster,
                memory=self._memory,
                monotonic=view.now_seconds,
                settings=self.settings,
                telemetry=core.Readings(snapshot=self._snapshot(view, matched)),
            )
        )
        self._memory = round_.memory
        return round_.replan_soon

    def running_pods(self, view: View) -> list[Body]:
        """The bound pods that run: a job's gang only once every replica is bound (a bound
        member waits on its GPUs for the others, doing no work, as a gang job does)."""
        gangs = {job.key: job.replicas for job in view.jobs}
        bound: dict[str, list[Body]] = {}
        for pod in self._pods.values():
            if pod["spec"].get("nodeName"):
                bound.setdefault(core.pod_workload_key(pod), []).append(pod)
        return [
            pod
            for key, pods in sorted(bound.items())
            if len(pods) >= gangs.get(key, 0)
            for pod in pods
        ]


def _gpus(pod: Mapping[str, Any]) -> int:
    return int(pod["spec"]["containers"][0]["resources"]["limits"][GPU_RESOURCE])


def _best_variants_only(plan_input: PlanInput) -> PlanInput:
    return dataclasses.replace(
        plan_input,
        workloads=tuple(
            dataclasses.replace(w, variants=(max(w.variants, key=lambda v: v.quality),))
            for w in plan_input.workloads
        ),
    )

"""Applying a round: the writes a `core.Round` asks for, in an order that never breaks a budget.

The order (see `Applier.apply`): the failure bookkeeping and the Events decided before the
solve; lower power limits and wait for the agents to confirm; evict preempted and moved pods
(Eviction API, so PodDisruptionBudgets hold) and delete failed pods due for a retry, then report
the evictions that went; create new pods; raise limits, only when every lowering was confirmed,
without waiting for the agents to confirm them (the next rounds count those nodes as ready at the
raised limits until the confirmation timeout: `core.RaiseInFlight`); open profiles for excluded
GPU nodes; then the metrics. Status writes and their Events are handed to the
`writer.StatusWriter` where the round decides them and written in the background (a round's
workload statuses are built there as it has room): the round does not wait for them, nor does the
next round's pod creation. A node whose agent does not confirm a lowering in time counts at
maximum power in the next round (`core.after_apply`), one whose agent has not confirmed a raise
within the timeout in the rounds after that.

Decisions are the core's; this module only writes, and reports what it saw (`core.Applied`).
Failed writes are logged, counted (`reconcile_errors`) and retried by the next round.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from wattsched_api.meta import format_time
from wattsched_operator import core, desired, services, statuses, transition
from wattsched_operator.cache import PROFILES, WORKLOADS, ClusterCache
from wattsched_operator.core import ClusterView, ObjectRef
from wattsched_operator.kube import (
    HTTP_CONFLICT,
    HTTP_NOT_FOUND,
    HTTP_TOO_MANY_REQUESTS,
    Kube,
    KubeError,
    budgets_path,
    pods_path,
    profiles_path,
    services_path,
    workloads_path,
)
from wattsched_operator.writer import DEFAULT_CONCURRENCY, StatusWriter

logger = logging.getLogger("wattsched.operator")

T = TypeVar("T")

Call = Callable[..., Awaitable[Any]]


def refuses_the_pod(error: KubeError) -> bool:
    """Whether the API server refused a pod (any 4xx: a malformed or invalid template, Pod
    Security, a quota, a webhook, the operator's own permissions), as opposed to a name still
    taken (409, retried next round), throttling (429) or a server fault (5xx), which are retried.
    A refusal is reported on the workload (`PodRejected`) and retried with backoff."""
    return 400 <= error.status < 500 and error.status not in {
        HTTP_CONFLICT,
        HTTP_TOO_MANY_REQUESTS,
    }


def object_path(ref: ObjectRef) -> str:
    """The API path of an object a round writes."""
    if ref.kind == core.WORKLOAD_KIND:
        return workloads_path(ref.namespace or "", ref.name)
    if ref.kind == core.BUDGET_KIND:
        return budgets_path(ref.name)
    if ref.kind == core.POD_KIND:
        return pods_path(ref.namespace or "", ref.name)
    raise ValueError(f"no writes to a {ref.kind}")


class Applier:
    """Executes Rounds against the API server (through `call`, which runs a blocking `Kube`
    method off the event loop) and keeps the cache's profiles up to date with what it wrote."""

    def __init__(
        self,
        *,
        kube: Kube,
        cache: ClusterCache,
        metrics: Any,
        call: Call,
        confirm_timeout_seconds: float,
        heartbeat_timeout_seconds: float,
        namespaces: tuple[str, ...] = (),
        writer_concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.kube = kube
        self.namespaces = namespaces  # served namespaces; empty: all
        self.cache = cache
        self.metrics = metrics
        self.call = call
        self.confirm_timeout_seconds = confirm_timeout_seconds
        self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
        self.writer = StatusWriter(
            write_status=self.write_status,
            post_event=self.event,
            path_of=object_path,
            current_body=self.current_body,
            on_error=self.status_write_failed,
            concurrency=writer_concurrency,
        )

    async def apply(self, round_: core.Round, view: ClusterView) -> core.Applied:
        """Every write of `round_`, in the budget-safe order; returns what it saw."""
        plan = round_.plan
        if plan is not None:
            self.metrics.plans.labels(status=str(plan.status)).inc()
            self.metrics.solve_seconds.observe(plan.solve_seconds)
            self.metrics.gap.set(plan.gap)
        if round_.metrics.corrections is not None:
            self.metrics.set_corrections(round_.metrics.corrections)

        # 0. What was decided before the solve: failures counted, nodes left out, workloads
        # not admitted.
        for patch in round_.patches:
            await self.call(self.kube.merge_patch, object_path(patch.object), patch.patch)
        await self.gather(self.event(e) for e in round_.events)
        for write in round_.early_statuses:
            self.writer.submit(write)

        # 1. Lower limits and wait for the agents to confirm.
        unconfirmed: set[str] = set()
        if plan is not None:
            generations = await self.write_limits(view, round_.lower)
            unconfirmed = await self.wait_confirmed(generations)
            self.metrics.unconfirmed_nodes.set(len(unconfirmed))
            if unconfirmed:
                logger.warning(
                    "agents on %s did not confirm lowered limits within %.0f s; they count at "
                    "maximum power in the next plan",
                    ", ".join(sorted(unconfirmed)),
                    self.confirm_timeout_seconds,
                )
                self.cache.mark_dirty()
        if round_.replan_soon:
            self.cache.mark_dirty()  # the next round moves the next replica, or retries a name

        # 2. Evict preempted and moved pods, a service's moves one replica at a time unless a
        # budget forces them; delete failed pods due for a retry.
        for write in round_.moving:
            self.writer.submit(write)
        evicted = await self.evict_pods(round_.evict)
        went = set(evicted)
        await self.gather(
            self.delete_pod(d) for d in round_.delete if (d.namespace, d.name) not in went
        )
        report = round_.disruptions.report(evicted)
        for cause, count in report.moves.items():
            self.metrics.moves.labels(cause=cause).inc(count)
        for cause, count in report.preemptions.items():
            self.metrics.preemptions.labels(cause=cause).inc(count)
        await self.gather(self.event(e) for e in report.events)

        # 3. Create new pods.
        results = await asyncio.gather(
            *(self.create_pod(p) for p in round_.create), return_exceptions=True
        )
        refused: dict[str, str] = {}
        accepted: set[str] = set()
        for pod, result in zip(round_.create, results, strict=True):
            key = core.pod_workload_key(pod)
            if isinstance(result, BaseException):
                self.failed_step(result)
            elif result is True:
                accepted.add(key)
            elif isinstance(result, str):
                refused[key] = result
        await self.gather(
            self.call(
                self.kube.write,
                pods_path(ns, name),
                {"metadata": {"annotations": {desired.ANNOTATION_POWER_LIMIT: watts}}},
            )
            for (ns, name), watts in round_.relabel.items()
        )
        if round_.services is not None:
            await self.apply_services(round_.services, view)

        # 4. Raise limits, only when every lowering was confirmed. The round does not wait for
        # the agents to report them: the next rounds count those nodes as ready at the raised
        # limits until the confirmation timeout (`core.RaiseInFlight`).
        raised: dict[str, core.RaiseInFlight] = {}
        if plan is not None and not unconfirmed:
            generations = await self.write_limits(view, round_.raise_)
            deadline = time.monotonic() + self.confirm_timeout_seconds
            raised = {
                node: core.RaiseInFlight(generation, deadline)
                for node, generation in generations.items()
                if generation > 0
            }
        if round_.open_profiles:
            await self.write_limits(view, round_.open_profiles)

        # 5. Statuses and their Events (to the writer), metrics. A workload whose pod was refused
        # in this round keeps its status: the next round reports it (PodRejected), not Placed.
        # Each status is built against the status its workload has when the writer builds it:
        # at once where the round counted energy (the next round's accounting starts from it),
        # the others as the writer has room.
        phases: list[str] = []
        slo_met: dict[str, bool] = {}
        lazily: list[core.WorkloadStatus] = []
        for status in round_.workload_statuses:
            if status.key in refused:
                phase, met = status.previous_phase, status.previous_slo_met
            else:
                phase, met = status.phase, status.slo_met
                if status.counted:
                    self.writer.submit_built(status)
                elif status.build is not None:
                    lazily.append(status)
            phases.append(phase)
            if met is not None:
                slo_met[status.key] = met
        self.writer.submit_lazily(lazily)
        update = round_.metrics
        for energy in update.workload_energy:
            self.metrics.count_workload_energy(
                energy.name, energy.joules, energy.grams, energy.source
            )
        for energy in update.budget_energy:
            self.metrics.count_budget_energy(
                energy.name, energy.joules, energy.grams, energy.source
            )
        if update.workloads is not None:
            self.metrics.set_phases(statuses.phase_counts(phases))
            self.metrics.set_slo(slo_met)
            self.metrics.keep_workloads(set(update.workloads))
        if update.budgets is not None:
            self.metrics.set_budgets(update.budgets)
        for write in round_.budget_statuses:
            self.writer.submit(write)
        return core.Applied(
            unconfirmed=frozenset(unconfirmed),
            raised=raised,
            evicted=tuple(evicted),
            refused=refused,
            accepted=frozenset(accepted),
        )

    # -- writes ------------------------------------------------------------------------------------

    async def apply_services(self, want: services.WantedServices, view: ClusterView) -> None:
        """Make the operator's Services match `want` (`services.service_changes`): each
        Inference workload's, and a headless one per replica that spans nodes."""
        namespaces = self.namespaces or sorted({key.partition("/")[0] for key in view.workloads})
        current: list[Mapping[str, Any]] = []
        for namespace in namespaces:
            current += await self.call(
                functools.partial(self.kube.list, keep=services.compared),
                services_path(namespace),
                desired.LABEL_WORKLOAD,
            )
        changes = services.service_changes(current, want)
        await self.gather(
            self.call(self.kube.delete, services_path(ns, name)) for ns, name in changes.delete
        )
        await self.gather(
            self.call(self.kube.write, services_path(ns, name), body)
            for (ns, name), body in changes.patch.items()
        )
        await self.gather(self.create_service(service) for service in changes.create)

    async def create_service(self, service: Mapping[str, Any]) -> None:
        meta = service["metadata"]
        try:
            await self.call(self.kube.write, services_path(meta["namespace"]), service, False)
        except KubeError as error:
            if error.status != HTTP_CONFLICT:
                raise
            logger.warning(
                "Service %s/%s exists and is not wattsched's (or is being deleted); left alone",
                meta["namespace"],
                meta["name"],
            )

    def failed_step(self, error: BaseException) -> None:
        logger.warning("apply step failed: %s", error)
        self.metrics.reconcile_errors.labels(step="apply").inc()
        self.cache.mark_dirty()

    async def gather(self, calls: Iterable[Awaitable[Any]]) -> None:
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                self.failed_step(result)

    def current_body(self, ref: ObjectRef) -> Mapping[str, Any] | None:
        """The cache's body of a workload whose status the writer builds (None: not cached)."""
        if ref.kind != core.WORKLOAD_KIND:
            return None
        return self.cache.get(WORKLOADS, f"{ref.namespace}/{ref.name}")

    async def write_status(self, path: str, body: Mapping[str, Any]) -> None:
        """A merge patch of a status subresource (the writer's way out)."""
        await self.call(self.kube.write, path, body)

    def status_write_failed(self, error: BaseException) -> None:
        """A status write failed (the writer retries it or leaves it to the next round)."""
        if self.metrics is not None:
            self.metrics.reconcile_errors.labels(step="apply").inc()

    async def evict_pods(self, evictions: Iterable[core.Eviction]) -> list[tuple[str, str]]:
        """Evict each pod (a pod on a node that is gone is deleted at once); return the ones
        that went. A PodDisruptionBudget's refusal (429) leaves the pod for the next round."""
        evictions = list(evictions)
        results = await asyncio.gather(
            *(self.evict_pod(e) for e in evictions), return_exceptions=True
        )
        evicted = []
        for eviction, result in zip(evictions, results, strict=True):
            if isinstance(result, BaseException):
                self.failed_step(result)
            elif result:
                evicted.append((eviction.namespace, eviction.name))
        return evicted

    async def evict_pod(self, eviction: core.Eviction) -> bool:
        namespace, name = eviction.namespace, eviction.name
        if eviction.node_gone:
            # No kubelet will ever confirm a graceful deletion on a node that is gone.
            await self.call(self.kube.delete, pods_path(namespace, name), 0)
            return True
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        }
        try:
            await self.call(self.kube.write, f"{pods_path(namespace, name)}/eviction", body, False)
        except KubeError as error:
            if error.status == HTTP_NOT_FOUND:
                return True
            if error.status != HTTP_TOO_MANY_REQUESTS:
                raise
            logger.info(
                "pod %s/%s: eviction refused by a PodDisruptionBudget; retried next round: %s",
                namespace,
                name,
                error.message,
            )
            self.cache.mark_dirty()
            return False
        return True

    async def delete_pod(self, deletion: core.Deletion) -> None:
        path = pods_path(deletion.namespace, deletion.name)
        if deletion.node_gone:
            # No kubelet will ever confirm a graceful deletion on a node that is gone.
            await self.call(self.kube.delete, path, 0)
        else:
            await self.call(self.kube.delete, path)

    async def create_pod(self, pod: Mapping[str, Any]) -> bool | str:
        """Create a pod: True when accepted, the API server's message when it refused the pod
        (validation, Pod Security, quota, ...: the core backs off, `core.after_apply`), False
        when its name is still taken (retried next round)."""
        namespace = pod["metadata"]["namespace"]
        try:
            await self.call(self.kube.write, pods_path(namespace), pod, False)
        except KubeError as error:
            if refuses_the_pod(error):
                logger.warning(
                    "workload %s: replica pod refused (%d): %s",
                    core.pod_workload_key(pod),
                    error.status,
                    error.message,
                )
                self.cache.mark_dirty()
                return error.message
            if error.status != HTTP_CONFLICT:
                raise
            self.cache.mark_dirty()  # a same-named pod still exists; retry next round
            return False
        return True

    async def write_limits(
        self, view: ClusterView, limits: Mapping[str, transition.NodeLimits]
    ) -> dict[str, int]:
        """Create or patch NodePowerProfiles; returns each node's new metadata.generation."""

        async def write(node: str, watts: transition.NodeLimits) -> tuple[str, int]:
            manifest = desired.node_power_profile(node, watts)
            # A merge patch carries nulls (an opt-in removed) that a created manifest leaves out.
            patch = {"spec": {"nodeName": node, **watts.spec_fields()}}
            if node in view.profiles:
                written = await self.call(self.kube.merge_patch, profiles_path(node), patch)
            else:
                node_body = view.nodes.get(node) or {}
                uid = (node_body.get("metadata") or {}).get("uid")
                if uid:
                    manifest["metadata"]["ownerReferences"] = [
                        {"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}
                    ]
                try:
                    written = await self.call(self.kube.create, profiles_path(), manifest)
                except KubeError as error:
                    if error.status != HTTP_CONFLICT:
                        raise
                    written = await self.call(self.kube.merge_patch, profiles_path(node), patch)
            self.cache.upsert(PROFILES, {**(view.profiles.get(node) or {}), **written})
            return node, int(written["metadata"].get("generation") or 1)

        results = await asyncio.gather(
            *(write(n, w) for n, w in sorted(limits.items())), return_exceptions=True
        )
        generations: dict[str, int] = {}
        for (node, _), result in zip(sorted(limits.items()), results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("writing NodePowerProfile %s failed: %s", node, result)
                self.metrics.reconcile_errors.labels(step="limits").inc()
                generations[node] = -1
            else:
                generations[node] = result[1]
        return generations

    async def wait_confirmed(self, generations: Mapping[str, int]) -> set[str]:
        """Wait until each agent reports its profile applied; returns the nodes that did not.

        Nodes whose agent is lost (silent for longer than the heartbeat timeout) are not waited
        for: they count at maximum power anyway, and no confirmation will come.
        """
        lost = self.silent_agents(generations)
        waiting = {node for node in generations if node not in lost}
        deadline = time.monotonic() + self.confirm_timeout_seconds
        while waiting:
            for node in list(waiting):
                profile = self.cache.get(PROFILES, node)
                generation = generations[node]
                if generation > 0 and profile and transition.is_confirmed(profile, generation):
                    waiting.discard(node)
            if not waiting or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        return waiting

    def silent_agents(self, nodes: Iterable[str]) -> set[str]:
        """Of `nodes`, those whose agent reported before and has been silent for longer than the
        heartbeat timeout."""
        now = datetime.now(UTC)
        silent = set()
        for node in nodes:
            beat = transition.agent_heartbeat(self.cache.get(PROFILES, node))
            if beat is not None and (now - beat).total_seconds() > self.heartbeat_timeout_seconds:
                silent.add(node)
        return silent

    async def event(self, event: core.Event) -> None:
        """A core/v1 Event on an object (best effort: a lost Event never stops a round)."""
        ref = event.object
        namespace = ref.namespace or "default"
        moment = format_time(datetime.now(UTC))
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{ref.name}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": ref.api_version,
                "kind": ref.kind,
                "name": ref.name,
                # Cluster-scoped objects (budgets, nodes) have their Events in "default".
                **({"namespace": ref.namespace} if ref.namespace else {}),
                "uid": ref.uid,
            },
            "reason": event.reason,
            "message": event.message[:1024],
            "type": event.type,
            "firstTimestamp": moment,
            "lastTimestamp": moment,
            "count": 1,
            "source": {"component": "wattsched-operator"},
            "reportingComponent": "wattsched-operator",
        }
        try:
            await self.call(self.kube.write, f"/api/v1/namespaces/{namespace}/events", body, False)
        except KubeError as error:
            logger.warning("could not post Event %s on %s: %s", event.reason, ref.name, error)

"""From pool-level replica counts to nodes: packing, repair, and filling what is left.

For: `ClusterState`, the free GPUs of every node and the headroom of every budget, with best-fit
placement of whole replicas on single nodes (`place`, `try_place`), removal, and the priority
repair (`place_with_eviction`): a workload the solver (or packing) left out is placed by evicting
strictly lower-priority work when that makes it fit, except running work that is not preemptible
(`PlanData.protected`), which is never evicted. Every placement re-checks every hard
constraint, so what leaves here is feasible whatever the solver returned. Not for: choosing
options (`options`) or solving (`formulation`).
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from wattsched_optimizer.options import Option, PlanData, Pool, WorkloadClass, workload_label
from wattsched_optimizer.problem import Workload

# Watts of slack when comparing a budget's headroom with a placement's extra watts.
WATTS_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Assignment:
    """A placed workload: its option and the node of each replica (by replica index)."""

    workload: Workload
    workload_class: int
    option_index: int
    option: Option
    nodes: tuple[str, ...]


class ClusterState:
    """Free GPUs per node, budget headroom, and what is placed. Mutated by placement calls."""

    def __init__(self, data: PlanData) -> None:
        self.data = data
        self.pool_of_node: dict[str, Pool] = {}
        self.free: dict[str, int] = {}
        self.pool_free_gpus: dict[int, int] = {p.index: p.total_gpus for p in data.pools}
        # (pool, free GPUs) -> how many of its nodes have exactly that many free.
        self.nodes_with_free: dict[tuple[int, int], int] = defaultdict(int)
        # (pool, free GPUs) -> heap of (node position in pool, node): best fit, lowest name first.
        self._buckets: dict[tuple[int, int], list[tuple[int, str]]] = defaultdict(list)
        self._position: dict[str, int] = {}
        for pool in data.pools:
            for position, node in enumerate(pool.node_names):
                self.pool_of_node[node] = pool
                self.free[node] = pool.gpus_per_node
                self._position[node] = position
                self._buckets[(pool.index, pool.gpus_per_node)].append((position, node))
                self.nodes_with_free[(pool.index, pool.gpus_per_node)] += 1
        for heap in self._buckets.values():
            heapq.heapify(heap)
        self.headroom: dict[str, float] = {
            name: data.budget_cap_watts[name] - data.budget_base_watts[name]
            for name in data.budget_cap_watts
        }
        self.placed: dict[str, Assignment] = {}
        # Per pool and per budget, GPUs / extra watts held by each priority (for quick checks),
        # counting only work that may be evicted.
        self.pool_gpus_by_priority: dict[int, dict[int, int]] = defaultdict(
            lambda: defaultdict(int)
        )
        self.budget_watts_by_priority: dict[str, dict[int, float]] = defaultdict(
            lambda: defaultdict(float)
        )

    # -- single replicas ---------------------------------------------------------------------

    @staticmethod
    def extra_watts(pool: Pool, option: Option) -> float:
        """What one replica adds to each budget of the pool over its GPUs' idle minimum."""
        if not pool.agent_ready:
            return 0.0
        return option.gpus_per_replica * max(option.power_limit_watts - pool.min_watts, 0.0)

    def _budget_fits(self, pool: Pool, extra: float) -> bool:
        return all(self.headroom[b] + WATTS_TOLERANCE >= extra for b in pool.budgets)

    def _set_free(self, node: str, free: int) -> None:
        pool = self.pool_of_node[node]
        self.pool_free_gpus[pool.index] += free - self.free[node]
        self.nodes_with_free[(pool.index, self.free[node])] -= 1
        self.nodes_with_free[(pool.index, free)] += 1
        self.free[node] = free
        heapq.heappush(self._buckets[(pool.index, free)], (self._position[node], node))

    def _best_fit_node(self, pool: Pool, gpus: int, prefer: Iterable[str] = ()) -> str | None:
        for node in prefer:
            if self.pool_of_node.get(node) is pool and self.free[node] >= gpus:
                return node
        for free in range(gpus, pool.gpus_per_node + 1):
            heap = self._buckets.get((pool.index, free))
            while heap:
                _, node = heap[0]
                if self.free[node] == free:
                    return node
                heapq.heappop(heap)  # stale entry
        return None

    def hold(self, node: str, gpus: int) -> int:
        """Take up to `gpus` free GPUs of a schedulable node aside; return how many were taken.

        Packing holds the GPUs of running replicas for their own workload, so that another
        workload's new replicas do not land there first and force a move.
        """
        if node not in self.free:
            return 0
        held = min(gpus, self.free[node])
        if held > 0:
            self._take(node, held)
        return held

    def release(self, node: str, gpus: int) -> None:
        """Give back GPUs that `hold` took aside."""
        self._set_free(node, self.free[node] + gpus)

    def _take(self, node: str, gpus: int) -> None:
        pool = self.pool_of_node[node]
        heap = self._buckets[(pool.index, self.free[node])]
        if heap and heap[0][1] == node:
            heapq.heappop(heap)
        self._set_free(node, self.free[node] - gpus)

    def evictable(self, assignment: Assignment) -> bool:
        """Whether the repair may stop this workload (running non-preemptible work it may not)."""
        return assignment.workload.key not in self.data.protected

    def _account(self, assignment: Assignment, sign: int) -> None:
        priority = assignment.workload.priority
        evictable = self.evictable(assignment)
        for node in assignment.nodes:
            pool = self.pool_of_node[node]
            gpus = assignment.option.gpus_per_replica
            extra = self.extra_watts(pool, assignment.option)
            if evictable:
                self.pool_gpus_by_priority[pool.index][priority] += sign * gpus
            for budget in pool.budgets:
                self.headroom[budget] -= sign * extra
                if evictable:
                    self.budget_watts_by_priority[budget][priority] += sign * extra

    # -- whole workloads ---------------------------------------------------------------------

    def place(
        self,
        workload: Workload,
        workload_class: WorkloadClass,
        option_index: int,
        pools_per_replica: Sequence[Sequence[int]],
        prefer: Sequence[str] = (),
    ) -> Assignment | None:
        """Place every replica (replica i on one of `pools_per_replica[i]`), or none at all.

        Each replica goes to one node with enough free GPUs (best fit, `prefer` first) in a pool
        whose budgets all have the headroom for it.
        """
        option = workload_class.options[option_index]
        nodes: list[str] = []
        for candidates in pools_per_replica:
            chosen = None
            for p in candidates:
                pool = self.data.pools[p]
                if not self._budget_fits(pool, self.extra_watts(pool, option)):
                    continue
                chosen = self._best_fit_node(pool, option.gpus_per_replica, prefer)
                if chosen is not None:
                    break
            if chosen is None:
                self._release_nodes(nodes, option)
                return None
            self._take(chosen, option.gpus_per_replica)
            pool = self.pool_of_node[chosen]
            for budget in pool.budgets:
                self.headroom[budget] -= self.extra_watts(pool, option)
            nodes.append(chosen)
        # The loop charged budgets replica by replica; `_account` charges them for good.
        self._release_budgets(nodes, option)
        assignment = Assignment(workload, workload_class.index, option_index, option, tuple(nodes))
        self._account(assignment, +1)
        self.placed[workload.key] = assignment
        return assignment

    def _release_budgets(self, nodes: Iterable[str], option: Option) -> None:
        for node in nodes:
            pool = self.pool_of_node[node]
            for budget in pool.budgets:
                self.headroom[budget] += self.extra_watts(pool, option)

    def _release_nodes(self, nodes: Iterable[str], option: Option) -> None:
        self._release_budgets(nodes, option)
        for node in nodes:
            self._set_free(node, self.free[node] + option.gpus_per_replica)

    def remove(self, key: str) -> Assignment:
        assignment = self.placed.pop(key)
        self._account(assignment, -1)
        for node in assignment.nodes:
            self._set_free(node, self.free[node] + assignment.option.gpus_per_replica)
        return assignment

    def restore(self, assignment: Assignment) -> None:
        """Put a removed assignment back on exactly its nodes (nothing else moved since)."""
        for node in assignment.nodes:
            self._take(node, assignment.option.gpus_per_replica)
        self._account(assignment, +1)
        self.placed[assignment.workload.key] = assignment

    def try_place(
        self, workload_class: WorkloadClass, workload: Workload, prefer: Sequence[str] = ()
    ) -> Assignment | None:
        """Place the workload with its most preferred option that fits now, or return None."""
        order = sorted(
            range(len(workload_class.options)),
            key=lambda o: (
                not workload_class.options[o].keeps_current,
                workload_class.options[o].quality_loss,
                workload_class.options[o].relative_cost,
                o,
            ),
        )
        for o in order:
            option = workload_class.options[o]
            pools = sorted(
                workload_class.option_pools[o],
                key=lambda p: (len(self.data.pools[p].budgets), p),
            )
            assignment = self.place(workload, workload_class, o, [pools] * option.replicas, prefer)
            if assignment is not None:
                return assignment
        return None

    # -- priority repair ---------------------------------------------------------------------

    def could_fit_without_lower(self, workload_class: WorkloadClass, priority: int) -> bool:
        """A necessary condition (aggregate GPUs and unavoidable budgets) for eviction to help.

        Only evictable work of a priority below `priority` counts as removable.
        """
        for o, option in enumerate(workload_class.options):
            pools = workload_class.option_pools[o]
            gpus = 0
            for p in pools:
                held = sum(
                    g for prio, g in self.pool_gpus_by_priority[p].items() if prio < priority
                )
                gpus += held + self.pool_free_gpus[p]
            if gpus < option.gpus:
                continue
            common = frozenset.intersection(*(self.data.pools[p].budgets for p in pools))
            extra = min(self.extra_watts(self.data.pools[p], option) for p in pools)
            if all(
                self.headroom[b]
                + sum(w for prio, w in self.budget_watts_by_priority[b].items() if prio < priority)
                + WATTS_TOLERANCE
                >= extra * option.replicas
                for b in common
            ):
                return True
        return False

    def place_with_eviction(
        self, workload_class: WorkloadClass, workload: Workload, prefer: Sequence[str] = ()
    ) -> tuple[Assignment, list[Assignment]] | None:
        """Place the workload by evicting strictly lower-priority work, if that makes it fit.

        Running work that is not preemptible is never evicted: the workload waits instead.
        Returns the assignment and the evicted assignments, or None with the state unchanged.
        """
        if not self.could_fit_without_lower(workload_class, workload.priority):
            return None
        pools = {p for ps in workload_class.option_pools for p in ps}
        budgets = frozenset().union(*(self.data.pools[p].budgets for p in pools))
        candidates = [
            a
            for a in self.placed.values()
            if a.workload.priority < workload.priority
            and self.evictable(a)
            and any(
                self.pool_of_node[n].index in pools or self.pool_of_node[n].budgets & budgets
                for n in a.nodes
            )
        ]
        candidates.sort(key=lambda a: (a.workload.priority, -a.option.gpus, a.workload.key))
        evicted: list[Assignment] = []
        for candidate in candidates:
            evicted.append(self.remove(candidate.workload.key))
            assignment = self.try_place(workload_class, workload, prefer)
            if assignment is not None:
                return assignment, evicted
        for assignment in reversed(evicted):
            self.restore(assignment)
        return None

    # -- explaining --------------------------------------------------------------------------

    def diagnose(self, workload_class: WorkloadClass, workload: Workload) -> tuple[str, str]:
        """(constraint, sentence) saying what keeps this workload out of the current state."""
        label = workload_label(workload)
        best_budget: tuple[float, str, Option, Pool] | None = None
        any_option_has_slots = False
        # The option closest to fitting by GPUs: (missing slots, free slots, replicas needed).
        closest = (math.inf, 0, 0)
        for o, option in enumerate(workload_class.options):
            pools = [self.data.pools[p] for p in workload_class.option_pools[o]]
            slots = sum(
                self.nodes_with_free[(pool.index, free)] * (free // option.gpus_per_replica)
                for pool in pools
                for free in range(option.gpus_per_replica, pool.gpus_per_node + 1)
            )
            if slots < option.replicas:
                closest = min(closest, (option.replicas - slots, slots, option.replicas))
                continue
            any_option_has_slots = True
            for pool in pools:
                extra = self.extra_watts(pool, option) * option.replicas
                for budget in sorted(pool.budgets):
                    short = extra - self.headroom[budget]
                    if short > WATTS_TOLERANCE and (best_budget is None or short < best_budget[0]):
                        best_budget = (short, budget, option, pool)
        if best_budget is not None:
            short, budget, option, pool = best_budget
            return (
                f"budget:{budget}",
                f"{label}: EnergyBudget {budget} has {max(self.headroom[budget], 0):.0f} W of "
                f"headroom after higher-priority and running non-preemptible work, and the "
                f"cheapest way to run it "
                f"({option.replicas} x {option.gpus_per_replica} {pool.product} GPU(s) at "
                f"{option.power_limit_watts:.0f} W instead of the {pool.min_watts:.0f} W idle "
                f"minimum) needs {short:.0f} W more; raise spec.powerCapWatts of {budget}, "
                "allow a lower power level (spec.energy), or give this workload a higher priority",
            )
        products = sorted({o.product for o in workload_class.options})
        if not any_option_has_slots:
            _, slots_seen, needed = closest
            return (
                "gpus",
                f"{label}: needs {needed} replica(s) of {workload.gpus_per_replica} GPU(s) on one "
                f"node each ({', '.join(products)}), but only {slots_seen} such slot(s) are free "
                "after higher-priority and running non-preemptible work; add nodes, lower "
                "spec.gpu.count or "
                "spec.minReplicas, or give this workload a higher priority",
            )
        return (
            "packing",
            f"{label}: enough GPUs and budget exist in total but not together on nodes and "
            "budgets that fit every replica; lower spec.gpu.count or add nodes",
        )

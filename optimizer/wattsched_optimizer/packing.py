"""From pool-level replica counts to nodes: packing, repair, and filling what is left.

For: `ClusterState`, the free GPUs of every node and the headroom of every budget, with best-fit
placement of whole replicas on single nodes, or on whole nodes of one pool for a replica that
spans nodes (`place`, `try_place`), removal, and the priority
repair (`place_with_eviction`): a workload the solver (or packing) left out is placed by evicting
strictly lower-priority work when that makes it fit, except running work that is not preemptible
(`PlanData.protected`), which is never evicted; and serving a service in part
(`place_in_part`): as much of its demand as fits once such lower-priority work is out of the way.
Every placement re-checks every hard
constraint, so what leaves here is feasible whatever the solver returned. Not for: choosing
options (`options`) or solving (`formulation`).

Vacated GPUs: the GPUs that running replicas occupy at planning time. A replica whose option keeps
its workload's product and variant goes back onto its workload's own running GPUs first; every
other replica goes onto GPUs no running replica occupies, while any of the same product are free,
and onto vacated ones only when none are. A moved replica's old copy can then keep serving while
the new one starts (make-before-break), instead of being displaced by another workload's new one.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from wattsched_optimizer.options import (
    Option,
    PlanData,
    Pool,
    WorkloadClass,
    replica_count_field,
    workload_label,
)
from wattsched_optimizer.problem import Workload

# Watts of slack when comparing a budget's headroom with a placement's extra watts.
WATTS_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Taken:
    """GPUs taken on one node: in all, how many of them were vacated, and how many of those
    were `owner`'s own running GPUs (a replica or hold that stays where its workload runs)."""

    node: str
    gpus: int
    vacated: int = 0
    own: int = 0
    owner: str = ""


@dataclass(frozen=True)
class Assignment:
    """A placed workload: its option and the node of each pod (by replica index, then rank:
    a replica that spans nodes has `option.nodes_per_replica` consecutive entries, leader first)."""

    workload: Workload
    workload_class: int
    option_index: int
    option: Option
    nodes: tuple[str, ...]
    # What each pod took on its node (same order as `nodes`), so removal gives back exactly.
    taken: tuple[Taken, ...] = field(default=(), compare=False)

    @property
    def replica_count(self) -> int:
        return len(self.nodes) // self.option.nodes_per_replica

    @property
    def stays(self) -> bool:
        """Whether every pod is on GPUs its workload's running replicas hold now (neither a move
        nor growth onto other GPUs)."""
        return all(t.own == t.gpus for t in self.taken)

    @property
    def replica_nodes(self) -> list[tuple[str, ...]]:
        """The nodes of each replica, leader first."""
        step = self.option.nodes_per_replica
        return [self.nodes[i : i + step] for i in range(0, len(self.nodes), step)]


class ClusterState:
    """Free GPUs per node, budget headroom, and what is placed. Mutated by placement calls.

    `running_gpus` maps (workload key, node) to the GPUs that workload's running replicas occupy
    on that node at planning time (the vacated GPUs, see the module docstring).
    """

    def __init__(
        self, data: PlanData, running_gpus: Mapping[tuple[str, str], int] | None = None
    ) -> None:
        self.data = data
        self.pool_of_node: dict[str, Pool] = {}
        self.free: dict[str, int] = {}
        # Free GPUs of each node that a running replica occupies at planning time (<= free).
        self.vacated_free: dict[str, int] = {}
        self.pool_vacated_free: dict[int, int] = {p.index: 0 for p in data.pools}
        # (workload, node) -> its running GPUs there not yet taken back by its own replicas.
        self._own_left: dict[tuple[str, str], int] = defaultdict(int)
        self.pool_free_gpus: dict[int, int] = {p.index: p.total_gpus for p in data.pools}
        # (pool, free GPUs) -> how many of its nodes have exactly that many free.
        self.nodes_with_free: dict[tuple[int, int], int] = defaultdict(int)
        # (pool, free GPUs, free GPUs not vacated) -> heap of (node position in pool, node):
        # best fit, lowest name first.
        self._buckets: dict[tuple[int, int, int], list[tuple[int, str]]] = defaultdict(list)
        self._position: dict[str, int] = {}
        for pool in data.pools:
            for position, node in enumerate(pool.node_names):
                self.pool_of_node[node] = pool
                self.free[node] = pool.gpus_per_node
                self.vacated_free[node] = 0
                self._position[node] = position
        for (key, node), gpus in sorted((running_gpus or {}).items()):
            if node in self.free and gpus > 0:
                self._own_left[(key, node)] = gpus
                vacated = min(self.vacated_free[node] + gpus, self.free[node])
                self.pool_vacated_free[self.pool_of_node[node].index] += (
                    vacated - self.vacated_free[node]
                )
                self.vacated_free[node] = vacated
        for pool in data.pools:
            for node in pool.node_names:
                fresh = self.free[node] - self.vacated_free[node]
                self._buckets[(pool.index, self.free[node], fresh)].append(
                    (self._position[node], node)
                )
                self.nodes_with_free[(pool.index, self.free[node])] += 1
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
        """What one pod (the whole replica unless it spans nodes) adds to each budget of the pool
        over its GPUs' idle minimum."""
        if not pool.agent_ready:
            return 0.0
        return option.gpus_per_pod * max(option.power_limit_watts - pool.min_watts, 0.0)

    def _budget_fits(self, pool: Pool, extra: float) -> bool:
        return all(self.headroom[b] + WATTS_TOLERANCE >= extra for b in pool.budgets)

    def fresh_free(self, node: str) -> int:
        """Free GPUs of the node that no running replica occupies at planning time."""
        return self.free[node] - self.vacated_free[node]

    def _apply(self, taken: Taken, sign: int) -> None:
        """Take (`sign` -1) or give back (+1) what `taken` describes."""
        node = taken.node
        pool = self.pool_of_node[node]
        free, vacated = self.free[node], self.vacated_free[node]
        heap = self._buckets.get((pool.index, free, free - vacated))
        if heap and heap[0][1] == node:
            heapq.heappop(heap)
        new_free = free + sign * taken.gpus
        new_vacated = vacated + sign * taken.vacated
        if taken.own:
            self._own_left[(taken.owner, node)] += sign * taken.own
        self.pool_free_gpus[pool.index] += new_free - free
        self.pool_vacated_free[pool.index] += new_vacated - vacated
        self.nodes_with_free[(pool.index, free)] -= 1
        self.nodes_with_free[(pool.index, new_free)] += 1
        self.free[node] = new_free
        self.vacated_free[node] = new_vacated
        heapq.heappush(
            self._buckets[(pool.index, new_free, new_free - new_vacated)],
            (self._position[node], node),
        )

    def _claim(self, node: str, gpus: int, owner: str) -> Taken:
        """Take `gpus` free GPUs of the node: `owner`'s own vacated ones first (when `owner` is
        set), then ones no running replica occupies, then other vacated ones."""
        vacated_free = self.vacated_free[node]
        own = min(gpus, vacated_free, self._own_left.get((owner, node), 0)) if owner else 0
        from_vacated = own + max(gpus - own - (self.free[node] - vacated_free), 0)
        taken = Taken(node, gpus, from_vacated, own, owner if own else "")
        self._apply(taken, -1)
        return taken

    def _takes_no_others_vacated(self, node: str, gpus: int, owner: str) -> bool:
        own = min(self.vacated_free[node], self._own_left.get((owner, node), 0)) if owner else 0
        return own + self.fresh_free(node) >= gpus

    def _bucket_node(self, pool: Pool, free: int, fresh: int) -> str | None:
        heap = self._buckets.get((pool.index, free, fresh))
        while heap:
            _, node = heap[0]
            if self.free[node] == free and self.fresh_free(node) == fresh:
                return node
            heapq.heappop(heap)  # stale entry
        return None

    def _best_fit_node(self, pool: Pool, gpus: int, *, fresh_only: bool) -> str | None:
        """The node with the fewest free GPUs that fits: with `fresh_only`, only nodes with
        `gpus` free GPUs that no running replica occupies (fewest such first); otherwise any,
        the ones that need the fewest vacated GPUs first."""
        if not self.pool_vacated_free[pool.index]:
            # Every free GPU of the pool is fresh: one best-fit pass finds whatever fits.
            if not fresh_only:
                return None
            for free in range(gpus, pool.gpus_per_node + 1):
                node = self._bucket_node(pool, free, free)
                if node is not None:
                    return node
            return None
        for free in range(gpus, pool.gpus_per_node + 1):
            if fresh_only:
                fresh_counts: Iterable[int] = range(gpus, free + 1)
            else:
                fresh_counts = range(min(gpus, free + 1) - 1, -1, -1)
            for fresh in fresh_counts:
                node = self._bucket_node(pool, free, fresh)
                if node is not None:
                    return node
        return None

    def hold(self, owner: str, node: str, gpus: int) -> Taken | None:
        """Take up to `gpus` free GPUs of a schedulable node aside for `owner`, which runs there.

        Packing holds the GPUs of running replicas for their own workload, so that another
        workload's new replicas do not land there first and force a move. Returns what was
        taken (for `release`), or None when nothing was.
        """
        if node not in self.free:
            return None
        held = min(gpus, self.free[node])
        if held <= 0:
            return None
        return self._claim(node, held, owner)

    def release(self, held: Taken) -> None:
        """Give back GPUs that `hold` took aside."""
        self._apply(held, +1)

    def evictable(self, assignment: Assignment) -> bool:
        """Whether the repair may stop this workload (running non-preemptible work it may not)."""
        return assignment.workload.key not in self.data.protected

    def _account(self, assignment: Assignment, sign: int) -> None:
        priority = assignment.workload.priority
        evictable = self.evictable(assignment)
        for node in assignment.nodes:
            pool = self.pool_of_node[node]
            gpus = assignment.option.gpus_per_pod
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

        Each replica goes to one node with enough free GPUs in a pool whose budgets all have the
        headroom for it: when the option keeps the workload's product and variant, first a node
        in `prefer` (where it runs); then best fit on GPUs no running replica occupies, over
        every candidate pool that takes new replicas in order; then best fit on any free GPUs.
        A pinned class's replicas that run now take only nodes in `prefer`.
        """
        option = workload_class.options[option_index]
        gpus = option.gpus_per_replica
        owner = workload.key if option.keeps_current else ""
        stay = prefer if option.keeps_current else ()
        # A pinned workload's running replicas stay on their nodes or it does not fit: only its
        # extra replicas (scaling up) go elsewhere, so no pinned replica moves without a reason.
        in_place = len(stay) if workload_class.pinned_nodes else 0
        taken: list[Taken] = []
        if option.nodes_per_replica > 1:
            spanning = self._place_spanning(option, pools_per_replica, stay, owner, in_place)
            if spanning is None:
                return None
            taken = spanning
        # A replica that spans nodes was placed above; the loop places single-node replicas.
        single = () if option.nodes_per_replica > 1 else pools_per_replica
        for replica, candidates in enumerate(single):
            chosen = self._stay_node(candidates, option, stay, owner) if stay else None
            if chosen is None and replica < in_place:
                self._release_taken(taken, option)
                return None
            # Pools whose budgets have the headroom, found during the first pass.
            fitting: list[Pool] = []
            for pool in (self.data.pools[p] for p in candidates):
                if chosen is not None:
                    break
                if not pool.schedulable:  # cordoned: keeps its running replicas, takes no new
                    continue
                if self._budget_fits(pool, self.extra_watts(pool, option)):
                    fitting.append(pool)
                    chosen = self._best_fit_node(pool, gpus, fresh_only=True)
            for pool in fitting:
                if chosen is not None:
                    break
                chosen = self._best_fit_node(pool, gpus, fresh_only=False)
            if chosen is None:
                self._release_taken(taken, option)
                return None
            taken.append(self._claim(chosen, gpus, owner))
            pool = self.pool_of_node[chosen]
            for budget in pool.budgets:
                self.headroom[budget] -= self.extra_watts(pool, option)
        nodes = tuple(t.node for t in taken)
        # The loop charged budgets replica by replica; `_account` charges them for good.
        self._release_budgets(nodes, option)
        assignment = Assignment(
            workload, workload_class.index, option_index, option, nodes, tuple(taken)
        )
        self._account(assignment, +1)
        self.placed[workload.key] = assignment
        return assignment

    def _place_spanning(
        self,
        option: Option,
        pools_per_replica: Sequence[Sequence[int]],
        stay: Sequence[str],
        owner: str,
        in_place: int,
    ) -> list[Taken] | None:
        """Every replica of an option that spans nodes on `nodes_per_replica` whole free nodes
        of one pool (all its pods or none), or None with nothing taken.

        Replica i first takes back the nodes its pods run on (`stay[i*n:(i+1)*n]`, leader
        first) when all of them are whole and free in one candidate pool; then whole nodes no
        running replica occupies, then any whole free nodes, pool by pool. The first `in_place`
        pods (a pinned workload's running replicas) must stay.
        """
        per = option.nodes_per_replica
        gpus = option.gpus_per_pod
        taken: list[Taken] = []
        for replica, candidates in enumerate(pools_per_replica):
            chosen: list[str] | None = None
            mine = list(stay[replica * per : (replica + 1) * per])
            pools = {self.pool_of_node[n].index for n in mine if n in self.pool_of_node}
            if (
                len(mine) == per
                and len(pools) == 1
                and next(iter(pools)) in candidates
                and all(self.free[n] == gpus for n in mine)
                and self._budget_fits(
                    self.pool_of_node[mine[0]],
                    per * self.extra_watts(self.pool_of_node[mine[0]], option),
                )
            ):
                chosen = mine
            if chosen is None and replica * per < in_place:
                self._release_taken(taken, option)
                return None
            for pool in (self.data.pools[p] for p in candidates):
                if chosen is not None:
                    break
                if not pool.schedulable or not self._budget_fits(
                    pool, per * self.extra_watts(pool, option)
                ):
                    continue
                whole = [n for n in pool.node_names if self.free[n] == gpus]
                # Nodes no running replica occupies first, then the workload's own, then others'.
                whole.sort(
                    key=lambda n: (
                        self.fresh_free(n) < gpus
                        and not self._takes_no_others_vacated(n, gpus, owner),
                        self.fresh_free(n) < gpus,
                        self._position[n],
                    )
                )
                if len(whole) >= per:
                    chosen = whole[:per]
            if chosen is None:
                self._release_taken(taken, option)
                return None
            for node in chosen:
                taken.append(self._claim(node, gpus, owner))
                pool = self.pool_of_node[node]
                for budget in pool.budgets:
                    self.headroom[budget] -= self.extra_watts(pool, option)
        return taken

    def _stay_node(
        self, candidates: Sequence[int], option: Option, prefer: Sequence[str], owner: str
    ) -> str | None:
        """A node of `prefer` in one of the `candidates` pools whose budgets have the headroom:
        first one where `owner` still has a replica's worth of its own running GPUs to take
        back, then one that takes new replicas where the replica fits without taking another
        workload's vacated GPUs."""
        gpus = option.gpus_per_pod
        nodes = []
        for node in prefer:
            pool = self.pool_of_node.get(node)
            if (
                pool is not None
                and pool.index in candidates
                and self.free[node] >= gpus
                and self._budget_fits(pool, self.extra_watts(pool, option))
            ):
                nodes.append(node)
        for node in nodes:
            if min(self.vacated_free[node], self._own_left.get((owner, node), 0)) >= gpus:
                return node
        for node in nodes:
            # A cordoned node keeps only the replicas that run there (their own GPUs, above).
            if self.pool_of_node[node].schedulable and self._takes_no_others_vacated(
                node, gpus, owner
            ):
                return node
        return None

    def _release_budgets(self, nodes: Iterable[str], option: Option) -> None:
        for node in nodes:
            pool = self.pool_of_node[node]
            for budget in pool.budgets:
                self.headroom[budget] += self.extra_watts(pool, option)

    def _release_taken(self, taken: Iterable[Taken], option: Option) -> None:
        taken = list(taken)
        self._release_budgets((t.node for t in taken), option)
        for t in taken:
            self._apply(t, +1)

    def remove(self, key: str) -> Assignment:
        assignment = self.placed.pop(key)
        self._account(assignment, -1)
        for taken in assignment.taken:
            self._apply(taken, +1)
        return assignment

    def restore(self, assignment: Assignment) -> None:
        """Put a removed assignment back on exactly its nodes (nothing else moved since)."""
        for taken in assignment.taken:
            self._apply(taken, -1)
        self._account(assignment, +1)
        self.placed[assignment.workload.key] = assignment

    def try_place(
        self, workload_class: WorkloadClass, workload: Workload, prefer: Sequence[str] = ()
    ) -> Assignment | None:
        """Place the workload with its most preferred option that fits now, or return None
        (an option that serves more of an Inference demand is preferred to any that serves less)."""
        order = sorted(
            range(len(workload_class.options)),
            key=lambda o: (
                workload_class.options[o].shortfall_steps,
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

    def could_fit_without_lower(self, workload_class: WorkloadClass, priority: float) -> bool:
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
                >= extra * option.replicas * option.nodes_per_replica
                for b in common
            ):
                return True
        return False

    def place_with_eviction(
        self,
        workload_class: WorkloadClass,
        workload: Workload,
        prefer: Sequence[str] = (),
        *,
        above: float | None = None,
    ) -> tuple[Assignment, list[Assignment]] | None:
        """Place the workload by evicting strictly lower-priority work, if that makes it fit.

        Running work that is not preemptible is never evicted: the workload waits instead.
        Returns the assignment and the evicted assignments, or None with the state unchanged.
        """
        priority = workload.priority if above is None else above
        if not self.could_fit_without_lower(workload_class, priority):
            return None
        evicted: list[Assignment] = []
        for candidate in self._eviction_candidates(workload_class, priority):
            evicted.append(self.remove(candidate.workload.key))
            assignment = self.try_place(workload_class, workload, prefer)
            if assignment is not None:
                return assignment, evicted
        for assignment in reversed(evicted):
            self.restore(assignment)
        return None

    def _eviction_candidates(
        self, workload_class: WorkloadClass, priority: float
    ) -> list[Assignment]:
        """Placed work the repair may evict for a workload of `priority` in `workload_class`:
        strictly lower priority, evictable, on the class's pools or budgets; the lowest priority
        and the most GPUs first."""
        pools = {p for ps in workload_class.option_pools for p in ps}
        budgets = frozenset().union(*(self.data.pools[p].budgets for p in pools))
        candidates = [
            a
            for a in self.placed.values()
            if a.workload.priority < priority
            and self.evictable(a)
            and any(
                self.pool_of_node[n].index in pools or self.pool_of_node[n].budgets & budgets
                for n in a.nodes
            )
        ]
        candidates.sort(key=lambda a: (a.workload.priority, -a.option.gpus, a.workload.key))
        return candidates

    def room_for_a_replica(self, gpus_per_pod: int, priority: float) -> bool:
        """A necessary condition for placing one replica of `gpus_per_pod` GPUs per node: some
        pool has a node with that many free, or that many free and held by evictable work of a
        priority below `priority` together."""
        for pool in self.data.pools:
            if pool.gpus_per_node < gpus_per_pod:
                continue
            if any(
                self.nodes_with_free[(pool.index, free)] > 0
                for free in range(gpus_per_pod, pool.gpus_per_node + 1)
            ):
                return True
            lower = sum(
                gpus
                for prio, gpus in self.pool_gpus_by_priority[pool.index].items()
                if prio < priority
            )
            if lower and lower + self.pool_free_gpus[pool.index] >= gpus_per_pod:
                return True
        return False

    def place_in_part(
        self,
        workload_class: WorkloadClass,
        workload: Workload,
        prefer: Sequence[str] = (),
        *,
        above: float,
    ) -> tuple[Assignment, list[Assignment]] | None:
        """Place a service that cannot be served whole with its partial options (`workload_class`
        holds only those): the most of its demand that fits once every evictable workload of a
        priority below `above` is out of the way, evicting only as much of that work as it takes.

        So lower-priority work keeps only GPUs and watts the service could not use. `above` is
        the service's own priority, or infinity for a running non-preemptible service that stays
        where it runs (it goes before all evictable work, whatever its priority). Returns the
        assignment and the evicted assignments, or None with the state unchanged.
        """
        fits_now = self.try_place(workload_class, workload, prefer)
        most = min(option.shortfall_steps for option in workload_class.options)
        if fits_now is not None and fits_now.option.shortfall_steps == most:
            return fits_now, []

        def as_it_was() -> tuple[Assignment, list[Assignment]] | None:
            if fits_now is None:
                return None
            self.restore(fits_now)
            return fits_now, []

        if fits_now is not None:
            self.remove(workload.key)
        # Only options that serve more than what fits now, and that the aggregate test says
        # evicting lower-priority work could make room for, are worth an eviction test.
        steps_now = math.inf if fits_now is None else fits_now.option.shortfall_steps
        better = [
            o
            for o, option in enumerate(workload_class.options)
            if option.shortfall_steps < steps_now
            and self.could_fit_without_lower(_only(workload_class, [o]), above)
        ]
        if not better:
            return as_it_was()
        evicted = [
            self.remove(a.workload.key) for a in self._eviction_candidates(workload_class, above)
        ]
        best = self.try_place(_only(workload_class, better), workload, prefer)
        if best is not None:
            self.remove(workload.key)
        for assignment in reversed(evicted):
            self.restore(assignment)
        if best is None:
            return as_it_was()
        # Options serving at least as much as the best that fits; fewer evictions may do.
        narrowed = _only(
            workload_class,
            [
                o
                for o, option in enumerate(workload_class.options)
                if option.shortfall_steps <= best.option.shortfall_steps
            ],
        )
        placed = self.place_with_eviction(narrowed, workload, prefer, above=above)
        return as_it_was() if placed is None else placed

    def place_where_it_runs(
        self,
        workload_class: WorkloadClass,
        workload: Workload,
        running: Sequence[str],
        *,
        in_part: bool,
    ) -> tuple[Assignment, list[Assignment]] | None:
        """Keep running work where it runs (`running`: the node of each running pod): the last
        resort of running non-preemptible work that could not move or grow at its own priority.

        First as many replicas as run, or fewer, every one on its own GPUs, evicting any
        evictable work in the way; then, like any growth, more replicas where they fit now or
        by evicting only lower-priority work, every running pod still staying. Only the class's
        options that keep its product and variant; `in_part`: a service's partial options.
        Returns the assignment and the evicted assignments, or None with the state unchanged."""
        keeping = [o for o, option in enumerate(workload_class.options) if option.keeps_current]
        staying = [
            o
            for o in keeping
            if workload_class.options[o].replicas * workload_class.options[o].nodes_per_replica
            <= len(running)
        ]
        if not staying:
            return None
        stay = self._keep_running(_only(workload_class, staying), workload, running, in_part)
        if stay is None:
            return None
        kept, evicted = stay
        self.remove(workload.key)
        grown = self._keep_running(
            _only(workload_class, keeping), workload, running, in_part, above=workload.priority
        )
        if grown is not None and grown[0].option.shortfall_steps <= kept.option.shortfall_steps:
            return grown[0], evicted + grown[1]
        if grown is not None:
            self.undo(grown)
        self.restore(kept)
        return kept, evicted

    def _keep_running(
        self,
        workload_class: WorkloadClass,
        workload: Workload,
        running: Sequence[str],
        in_part: bool,
        above: float = math.inf,
    ) -> tuple[Assignment, list[Assignment]] | None:
        """Place with `workload_class`, evicting evictable work of a priority below `above`,
        only where every running pod of the workload stays on its GPUs (else None, undone)."""
        if in_part:
            placed = self.place_in_part(workload_class, workload, running, above=above)
        else:
            fits = self.try_place(workload_class, workload, running)
            placed = (
                (fits, [])
                if fits is not None
                else self.place_with_eviction(workload_class, workload, running, above=above)
            )
        if placed is None or not any(
            left for (owner, _), left in self._own_left.items() if owner == workload.key
        ):
            return placed
        self.undo(placed)
        return None

    def undo(self, placed: tuple[Assignment, list[Assignment]]) -> None:
        """Remove a placement and put back what it evicted."""
        self.remove(placed[0].workload.key)
        for assignment in reversed(placed[1]):
            self.restore(assignment)

    # -- explaining --------------------------------------------------------------------------

    def diagnose(self, workload_class: WorkloadClass, workload: Workload) -> tuple[str, str]:
        """(constraint, sentence) saying what keeps this workload out of the current state."""
        label = workload_label(workload)
        best_budget: tuple[float, float, str, Option, Pool] | None = None
        any_option_has_slots = False
        # The option closest to fitting by GPUs: (missing slots, free slots, replicas needed).
        closest = (math.inf, 0, 0)
        for o, option in enumerate(workload_class.options):
            pools = [self.data.pools[p] for p in workload_class.option_pools[o]]
            if option.nodes_per_replica > 1:
                # Whole free nodes of one pool, per replica.
                slots = sum(
                    self.nodes_with_free[(pool.index, pool.gpus_per_node)]
                    // option.nodes_per_replica
                    for pool in pools
                )
            else:
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
                extra = self.extra_watts(pool, option) * option.replicas * option.nodes_per_replica
                for budget in sorted(pool.budgets):
                    short = extra - self.headroom[budget]
                    if short > WATTS_TOLERANCE and (best_budget is None or short < best_budget[0]):
                        best_budget = (short, extra, budget, option, pool)
        if best_budget is not None:
            _, extra, budget, option, pool = best_budget
            # The figures add up as printed: headroom shown (never below 0) + missing = needed.
            headroom = max(self.headroom[budget], 0.0)
            return (
                f"budget:{budget}",
                f"{label}: EnergyBudget {budget} has {headroom:.0f} W of "
                f"headroom after higher-priority and running non-preemptible work, and the "
                f"cheapest way to run it "
                f"({option.replicas} x {option.gpus_per_replica} {pool.product} GPU(s) at "
                f"{option.power_limit_watts:.0f} W instead of the {pool.min_watts:.0f} W idle "
                f"minimum) needs {extra:.0f} W, {extra - headroom:.0f} W more than that; raise "
                f"spec.powerCapWatts of {budget}, "
                "allow a lower power level (spec.energy), or give this workload a higher priority",
            )
        products = sorted({o.product for o in workload_class.options})
        if not any_option_has_slots and workload.spans_nodes:
            _, slots_seen, needed = closest
            return (
                "gpus",
                f"{label}: needs {needed} replica(s) of {workload.nodes_per_replica} whole nodes "
                f"with {workload.gpus_per_pod} GPU(s) each, of one product and pool "
                f"({', '.join(products)}), but only {slots_seen} such group(s) of nodes are free "
                "after higher-priority and running non-preemptible work; add nodes, lower "
                f"{replica_count_field(workload)}, or give this workload a higher priority",
            )
        if not any_option_has_slots:
            _, slots_seen, needed = closest
            return (
                "gpus",
                f"{label}: needs {needed} replica(s) of {workload.gpus_per_replica} GPU(s) on one "
                f"node each ({', '.join(products)}), but only {slots_seen} such slot(s) are free "
                "after higher-priority and running non-preemptible work; add nodes, lower "
                f"spec.gpu.count or {replica_count_field(workload)}, or give this workload a "
                "higher priority",
            )
        return (
            "packing",
            f"{label}: enough GPUs and budget exist in total but not together on nodes and "
            "budgets that fit every replica; lower spec.gpu.count or add nodes",
        )


def _only(workload_class: WorkloadClass, options: Sequence[int]) -> WorkloadClass:
    """The class with only the options at these positions."""
    return WorkloadClass(
        index=workload_class.index,
        members=workload_class.members,
        options=tuple(workload_class.options[o] for o in options),
        option_pools=tuple(workload_class.option_pools[o] for o in options),
    )

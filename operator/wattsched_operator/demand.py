"""Inference demand: what a service's replicas are sized for in the next interval.

For: the forecast shared by the operator and the simulator's `wattsched` policy: over a recent
window, the highest demand a reading showed (the tokens/s served, plus the backlog, the tokens
waiting in the service's queues, drained within one re-plan interval) times a headroom, plus a
margin that grows with how much the readings spread (`SPREAD` standard deviations: a bursty
service's next burst above its recent peak is larger than a steady one's), times the largest
burst of the last hour (how far a reading outran the forecast made before it, where demand fell
back after it: a service whose bursts come every so often, not every few minutes, is sized for
the next one, in proportion to its current demand); and the
operator's bounded per-service history of readings it is made from (`DemandHistory`); whether a
fresh reading shows more demand than a plan gave a service (`exceeds_plan`); and, for the horizon
plan, the same hour of previous days (`HourlyDemand`).
Served tokens/s cannot show demand the replicas did not serve: a service with a queue serves all
it can, and its served rate is a lower bound on its demand; the backlog is what it could not
serve. Without measurements (no Prometheus, no fresh reading of every running replica, or none
within the window), a service's demand is its declared `spec.slo.tokensPerSecond`.

Pure: no Kubernetes, kopf, Prometheus or HTTP client; times come in as seconds.
Not for: reading telemetry or sizing replicas (the optimizer does, from the demand).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import deque
from collections.abc import Iterable

from wattsched_optimizer.problem import Workload, WorkloadType

# Defaults: the highest reading of the last 5 minutes plus two standard deviations of the
# window's readings, with no further headroom. Chosen on the simulator's seeds 3-8 (modelled, see
# docs/evaluation.md): against 1.2 x the peak, steady services get less margin (conv: its readings
# spread by ~7% of their mean) and bursty ones more (code: ~60%).
WINDOW_SECONDS = 300.0
HEADROOM = 1.0
SPREAD = 2.0
# Readings kept per service (a few windows' worth at one reading per round).
MAX_SAMPLES = 64
# How long a burst is remembered (`DemandHistory.demand`): as an autoscaler's scale-down
# stabilisation window, an hour after a burst the service is no longer sized for the next one.
# At most one burst per window's length is kept (the largest), a dozen per service.
BURST_MEMORY_SECONDS = 3600.0


def forecast(
    tokens_per_second: Iterable[float], *, headroom: float = HEADROOM, spread: float = SPREAD
) -> float | None:
    """Tokens/s to size for: the peak of the readings' demands times `headroom`, plus `spread`
    times their (population) standard deviation; None without readings."""
    readings = list(tokens_per_second)
    if not readings:
        return None
    return max(readings) * headroom + spread * statistics.pstdev(readings)


@dataclasses.dataclass(frozen=True)
class Reading:
    """One reading of a service: when (monotonic seconds), the tokens/s its running replicas
    served over the rate window, and the tokens waiting in their queues."""

    at_seconds: float
    tokens_per_second: float
    backlog_tokens: float = 0.0

    def demand(self, interval_seconds: float) -> float:
        """Tokens/s the service needed: what it served (all it could, when it had a queue: a
        lower bound) plus its backlog drained over `interval_seconds`."""
        return self.tokens_per_second + self.backlog_tokens / interval_seconds


@dataclasses.dataclass(frozen=True)
class Burst:
    """A reading whose demand outran the forecast made before it `ratio` times. `confirmed`
    once it has left the window with demand back below it (a burst, not a step up)."""

    at_seconds: float
    ratio: float
    demand: float
    confirmed: bool = False

    def fell_back(self, mean_after: float | None) -> bool:
        """Whether the mean demand of the window after the burst left it stayed nearer
        (geometrically) the forecast before the burst (its demand over its ratio) than the
        burst's demand: a burst. A step up stays at (or above) the burst's demand."""
        return mean_after is not None and mean_after < self.demand / self.ratio**0.5


class DemandHistory:
    """Readings (served tokens/s and backlog) per service, kept in memory (a restarted operator
    starts from the declared demand until its first readings).

    interval_seconds: the re-plan interval, within which a backlog must drain; headroom and
    spread: as `forecast`'s."""

    def __init__(
        self,
        window_seconds: float = WINDOW_SECONDS,
        headroom: float = HEADROOM,
        interval_seconds: float = 60.0,
        spread: float = SPREAD,
    ) -> None:
        self.window_seconds = window_seconds
        self.headroom = headroom
        self.spread = spread
        self.interval_seconds = interval_seconds
        self._samples: dict[str, deque[Reading]] = {}
        self._bursts: dict[str, deque[Burst]] = {}
        self._max_bursts = max(1, round(BURST_MEMORY_SECONDS / window_seconds)) + 1

    def record(
        self, key: str, at_seconds: float, tokens_per_second: float, backlog_tokens: float = 0.0
    ) -> None:
        reading = Reading(at_seconds, max(0.0, tokens_per_second), max(0.0, backlog_tokens))
        demands = self._window_demands(key, at_seconds)
        self._judge_bursts(key, at_seconds, demands)
        demand = reading.demand(self.interval_seconds)
        # The forecast is at least the window's peak times the headroom: below it, no burst
        # (most readings; the forecast's standard deviation is then not computed).
        if demands and demand > max(demands) * self.headroom:
            before = forecast(demands, headroom=self.headroom, spread=self.spread)
            if before and demand > before:
                self._add_burst(key, Burst(at_seconds, demand / before, demand))
        samples = self._samples.setdefault(key, deque(maxlen=MAX_SAMPLES))
        samples.append(reading)

    def _judge_bursts(self, key: str, at_seconds: float, demands: list[float]) -> None:
        """Confirm the bursts that left the window where demand fell back (the window's
        `demands`); drop the others (a step up, which the window's forecast now holds)."""
        bursts = self._bursts.get(key, ())
        due = [
            b for b in bursts if not b.confirmed and at_seconds - b.at_seconds > self.window_seconds
        ]
        if not due:
            return
        mean_after = statistics.fmean(demands) if demands else None
        self._bursts[key] = deque(
            (
                dataclasses.replace(b, confirmed=True) if b in due else b
                for b in bursts
                if b not in due or b.fell_back(mean_after)
            ),
            maxlen=self._max_bursts,
        )

    def _add_burst(self, key: str, burst: Burst) -> None:
        """Keep `burst`; of those within one window's length of each other, the largest."""
        bursts = self._bursts.setdefault(key, deque(maxlen=self._max_bursts))
        last = bursts[-1] if bursts else None
        if last and not last.confirmed and burst.at_seconds - last.at_seconds < self.window_seconds:
            if burst.ratio > last.ratio:
                bursts[-1] = burst
            return
        bursts.append(burst)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the history of services not in `keep` (deleted or finished)."""
        wanted = set(keep)
        for key in [k for k in self._samples if k not in wanted]:
            del self._samples[key]
        for key in [k for k in self._bursts if k not in wanted]:
            del self._bursts[key]

    def _window_demands(self, key: str, now_seconds: float) -> list[float]:
        """The `Reading.demand` of each reading within the window before `now_seconds`, oldest
        first (readings are recorded in time order: the newest are read until one is older than
        the window)."""
        demands = []
        for reading in reversed(self._samples.get(key, ())):
            if reading.at_seconds < now_seconds - self.window_seconds:
                break
            if reading.at_seconds <= now_seconds:
                demands.append(reading.demand(self.interval_seconds))
        demands.reverse()
        return demands

    def demand(self, key: str, now_seconds: float, declared: float | None) -> float | None:
        """The forecast from readings within the window (`forecast` of their `Reading.demand`s),
        else `declared`. The peak holds for the window: a backlog that drained does not size the
        service down at the next reading. After a burst (a reading that outran the forecast
        made before it, then demand fell back), the forecast is that burst's ratio times as
        large for `BURST_MEMORY_SECONDS`: the next burst is expected as large relative to the
        service's demand (the code trace's come about once an hour, at up to five times its
        mean). A step up (a launch, traffic moved over) is no burst: once it has left the
        window, the window's forecast holds the new level, and no margin is added above it."""
        predicted = forecast(
            self._window_demands(key, now_seconds), headroom=self.headroom, spread=self.spread
        )
        if predicted is None:
            return declared
        ratio = max(
            (
                b.ratio
                for b in self._bursts.get(key, ())
                if b.confirmed and now_seconds - b.at_seconds < BURST_MEMORY_SECONDS
            ),
            default=1.0,
        )
        return predicted * ratio

    def latest(self, key: str, now_seconds: float) -> float | None:
        """The newest reading's demand, without headroom: its served tokens/s plus its backlog
        over one interval (None without a reading within the window)."""
        demands = self._window_demands(key, now_seconds)
        return demands[-1] if demands else None


def exceeds_plan(
    history: DemandHistory,
    key: str,
    now_seconds: float,
    *,
    sized_for: float | None,
    capacity: float,
) -> bool:
    """Whether the newest reading of service `key` shows more demand (served tokens/s plus its
    backlog over one interval, no headroom) than both the plan's `capacity` for it (its
    replicas' expected tokens/s) and the demand the plan was `sized_for`.

    The first says the replicas fall short now, so waiting for the periodic re-plan loses
    requests; the second keeps a service the budget limits (capacity below what it was sized
    for) from asking again each reading while its demand does not grow.
    """
    latest = history.latest(key, now_seconds)
    if latest is None:
        return False
    return latest > capacity and latest > (sized_for or 0.0)


def with_forecast_demand(
    workloads: Iterable[Workload], history: DemandHistory, now_seconds: float
) -> tuple[Workload, ...]:
    """The optimizer's workloads with every Inference demand replaced by its forecast, where
    `history` has readings within its window (the declared demand otherwise). A workload whose
    demand stays as it is is the same object (no copy of every service per round)."""
    return tuple(
        _with_demand(
            workload, history.demand(workload.key, now_seconds, workload.tokens_per_second)
        )
        if workload.type is WorkloadType.INFERENCE
        else workload
        for workload in workloads
    )


def _with_demand(workload: Workload, tokens_per_second: float | None) -> Workload:
    if tokens_per_second == workload.tokens_per_second:
        return workload
    return dataclasses.replace(workload, tokens_per_second=tokens_per_second)


# Days of hourly peaks kept per service for the horizon's forecast (`HourlyDemand`).
HOURLY_DAYS = 7
# The horizon's margin over the mean of an hour's past peaks.
HOURLY_HEADROOM = 1.2
SECONDS_PER_HOUR = 3600


class HourlyDemand:
    """Per service, the peak tokens/s measured in each wall-clock hour of the last `days` days:
    the horizon's inference forecast. An hour ahead is forecast as the mean of the same hour of
    the previous days that have a reading, times `headroom`. An hour with no such reading is
    unknown, and is forecast as the most the service is known to need: the higher of its busiest
    recorded hour (times `headroom`; its recent peak, `DemandHistory.demand` passed in as
    `recent`, while no hour is recorded) and its declared `spec.slo.tokensPerSecond` (what it
    must absorb): its GPUs and cap room are held for that. The recent peak counts a backlog
    drained within one re-plan interval, which is no demand of the hours ahead; the current
    hour's recorded peak follows the service as closely without it. A service's night is no
    forecast of its midday: work deferred into hours planned at the night's demand finds the
    service's peak there, the cap taken, and runs late (docs/evaluation.md, "Budgets over time:
    48 hours"). Its energy in the allowances is counted at what it is expected to need
    (`expected_per_slot`: in an unknown hour the peak recorded so far in the current hour):
    counted at the most it may need, its energy would seem to spend the allowance, and work
    would wait for a period that does not need it. At most `days * 24` values per service.
    """

    def __init__(self, days: int = HOURLY_DAYS, headroom: float = HOURLY_HEADROOM) -> None:
        self.days = days
        self.headroom = headroom
        # service -> hour index since the epoch (UTC) -> peak tokens/s in that hour
        self._peaks: dict[str, dict[int, float]] = {}

    def record(self, key: str, epoch_seconds: float, tokens_per_second: float) -> None:
        hour = int(epoch_seconds // SECONDS_PER_HOUR)
        peaks = self._peaks.setdefault(key, {})
        peaks[hour] = max(peaks.get(hour, 0.0), tokens_per_second, 0.0)
        oldest = max(peaks) - self.days * 24
        for stale in [h for h in peaks if h <= oldest]:
            del peaks[stale]

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the history of services not in `keep` (deleted or finished)."""
        wanted = set(keep)
        for key in [k for k in self._peaks if k not in wanted]:
            del self._peaks[key]

    def per_slot(
        self,
        key: str,
        slot_start_epochs: Iterable[float],
        recent: float | None,
        declared: float | None = None,
    ) -> tuple[float, ...] | None:
        """What the service may need in each slot starting at these times (epoch seconds): in an
        hour with no history, the most it is known to need. None when there is neither history
        nor a recent or declared value."""
        starts = list(slot_start_epochs)
        known = [declared] if declared is not None else []
        kept = []
        if starts:
            # The busiest hour of the `days` before the first slot.
            first = int(starts[0] // SECONDS_PER_HOUR) - self.days * 24
            kept = [value for hour, value in self._peaks.get(key, {}).items() if hour >= first]
        if kept:
            known.append(max(kept) * self.headroom)
        elif recent is not None:
            known.append(recent)
        return self._forecast(key, starts, max(known) if known else None, recent)

    def expected_per_slot(
        self, key: str, slot_start_epochs: Iterable[float], recent: float | None
    ) -> tuple[float, ...] | None:
        """What the service is expected to need in each slot: in an hour with no history, the
        peak recorded so far in the hour of the first slot, else its recent peak (what its
        energy is counted at in the allowances)."""
        starts = list(slot_start_epochs)
        now_hour = int(starts[0] // SECONDS_PER_HOUR) if starts else None
        unknown = self._peaks.get(key, {}).get(now_hour, recent) if now_hour is not None else recent
        return self._forecast(key, starts, unknown, recent)

    def _forecast(
        self, key: str, starts: list[float], unknown: float | None, recent: float | None
    ) -> tuple[float, ...] | None:
        """The first slot (now): `recent` when known. Later slots: the same hour of the previous
        days where there is one (mean, times `headroom`), else `unknown`; None where an hour is
        unknown and `unknown` is None."""
        peaks = self._peaks.get(key, {})
        out = []
        for slot, start in enumerate(starts):
            if slot == 0 and recent is not None:
                # The first slot is now: the recent forecast, what the one-instant planner sizes
                # the service for this round.
                out.append(recent)
                continue
            hour = int(start // SECONDS_PER_HOUR)
            same_hour = [
                peaks[hour - 24 * day]
                for day in range(1, self.days + 1)
                if hour - 24 * day in peaks
            ]
            if same_hour:
                out.append(sum(same_hour) / len(same_hour) * self.headroom)
            elif unknown is not None:
                out.append(unknown)
            else:
                return None
        return tuple(out)

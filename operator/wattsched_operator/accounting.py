"""Energy and carbon accounting: the running totals in LLMWorkload and EnergyBudget status.

A workload's `status.energy` (joules since first placed) and a budget's `energyUsedJoules` and
`carbonGrams` (this period) are running totals, kept fine enough that each small increment counts;
the kWh and kg figures beside them are those totals rounded for people (1 Wh, 1 g). Each accounting
round advances them from the time they were last advanced (`accountedUntil`, kept in the status
itself, so a restarted operator goes on where the last one stopped and a status read from a lagging
cache is still self-consistent) to now. The increment is measured (Prometheus energy counters) when
every pod or node it covers was measured, else modelled (the plan's expected watts times the elapsed
seconds); `source` says `measured`, `modelled`, or `mixed` once both contributed. Carbon is each
increment's kWh times PUE times the carbon intensity of that moment, so a changing grid intensity is
followed.

Pure functions: the planning loop reads telemetry, calls these, and writes the statuses. Not for:
reading Prometheus, writing status, or deciding plans.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from wattsched_api.energybudget import Period, period_start
from wattsched_api.meta import format_time, read_timestamp
from wattsched_api.vocabulary import EnergySource, Source
from wattsched_operator.readings import Measurement, PodKey, TelemetrySnapshot

K = TypeVar("K", bound=Hashable)

JOULES_PER_KWH = 3.6e6
# What people read (statuses, `kubectl get -o wide`): kWh to the watt-hour, kg to the gram.
KWH_DECIMALS = 3
KG_DECIMALS = 3


def combined_source(before: str | None, increment: str) -> str:
    """The source of a total after adding an increment from `increment`."""
    if before in {None, increment}:
        return increment
    return EnergySource.MIXED


@dataclass(frozen=True)
class Increment:
    """Energy (J) used by a workload's GPUs or a budget's nodes since the last accounting, and
    whether it was `measured` or `modelled`."""

    joules: float
    source: str


@dataclass(frozen=True)
class CarbonIntensity:
    """Grams of CO2-equivalent per kWh, and where it came from (`static` or `prometheus`)."""

    grams_per_kwh: float
    source: str


@dataclass(frozen=True)
class BudgetTerms:
    """What an EnergyBudget's spec says about accounting (defaults as the CRD applies them)."""

    period: Period = Period.DAY
    pue: float = 1.0
    static_intensity: float | None = None
    intensity_query: str | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> BudgetTerms:
        carbon = spec.get("carbon") or {}
        static = carbon.get("intensityGramsPerKilowattHour")
        return cls(
            period=Period((spec.get("energy") or {}).get("period") or Period.DAY),
            pue=float(spec.get("pue") or 1.0),
            static_intensity=None if static is None else float(static),
            intensity_query=carbon.get("prometheusQuery") or None,
        )

    def intensity(self, queried: float | None) -> CarbonIntensity | None:
        """The intensity to use now: the query's answer, else the static figure, else none."""
        if queried is not None and queried >= 0:
            return CarbonIntensity(queried, "prometheus")
        if self.static_intensity is not None:
            return CarbonIntensity(self.static_intensity, "static")
        return None


def total_source(before: str | None, added: Increment | None, initial_source: str) -> str:
    """The source of a total after an increment (None: nothing added; a new total is
    `initial_source`)."""
    if added is None:
        return before or initial_source
    return combined_source(before, added.source)


def accounting_start(
    accounted_until: datetime | None, now: datetime, interval_seconds: float
) -> datetime | None:
    """When the increment due now starts; None when the total was advanced less than
    `interval_seconds` ago. A total never advanced starts at `now` (an empty first increment)."""
    if accounted_until is None:
        return now
    if (now - accounted_until).total_seconds() < interval_seconds:
        return None
    return min(accounted_until, now)


def workload_start(
    status: Mapping[str, Any], now: datetime, interval_seconds: float
) -> datetime | None:
    """The start of an LLMWorkload's increment due now (see `accounting_start`)."""
    energy = status.get("energy") or {}
    return accounting_start(read_timestamp(energy.get("accountedUntil")), now, interval_seconds)


def budget_start(
    status: Mapping[str, Any], now: datetime, period: Period, interval_seconds: float
) -> datetime | None:
    """The start of an EnergyBudget's increment due now; a new period is due at once and starts
    at the period's start (what the old period used since its last accounting is not carried)."""
    accounted = read_timestamp(status.get("accountedUntil"))
    begin = period_start(now, period)
    if accounted is not None and accounted < begin:
        return begin
    return accounting_start(accounted, now, interval_seconds)


def measured_sum(measured: Mapping[K, Measurement], keys: Iterable[K]) -> float | None:
    """The sum over `keys` when every one was measured (and there is at least one); else None."""
    wanted = list(keys)
    if not wanted or any(key not in measured for key in wanted):
        return None
    return sum(measured[key].value for key in wanted)


def increment(measured_joules: float | None, modelled_watts: float, seconds: float) -> Increment:
    """Measured joules when known (every part measured), else the model's watts over `seconds`."""
    if measured_joules is not None:
        return Increment(max(measured_joules, 0.0), Source.MEASURED)
    return Increment(max(modelled_watts, 0.0) * max(seconds, 0.0), Source.MODELLED)


def tokens_per_joule(
    snapshot: TelemetrySnapshot | None,
    pods: Iterable[PodKey],
    expected_tokens_per_second: float,
    expected_watts: float,
) -> tuple[float, str] | None:
    """(tokens/J, source): measured tokens/s over measured W of the pods when a fresh reading
    has both for every pod, else the plan's expected throughput over its expected watts."""
    keys = list(pods)
    if snapshot is not None and not snapshot.stale and keys:
        tokens = [snapshot.pod_tokens_per_second.get(key) for key in keys]
        watts = measured_sum(snapshot.pod_watts, keys)
        if watts and all(t is not None for t in tokens):
            return sum(t for t in tokens if t is not None) / watts, Source.MEASURED
    if expected_watts > 0 and expected_tokens_per_second > 0:
        return expected_tokens_per_second / expected_watts, Source.MODELLED
    return None


def workload_energy(
    previous: Mapping[str, Any],
    added: Increment | None,
    *,
    now: datetime,
    initial_source: str,
    pue: float = 1.0,
    carbon: CarbonIntensity | None = None,
    efficiency: tuple[float, str] | None = None,
) -> dict[str, Any]:
    """An LLMWorkload's `status.energy` advanced to `now`.

    `added` is None when the workload had no running pod since the last accounting (nothing
    used; the source stays). `initial_source` is the source of a total that starts now, empty.
    `efficiency` is (tokens per joule, source); left out when None. Carbon grams (when the
    workload's nodes are in a budget with a carbon intensity) add the increment's kWh x PUE x
    intensity.
    """
    joules = float(previous.get("joules") or 0.0) + (added.joules if added else 0.0)
    before = previous.get("source") if "accountedUntil" in previous else None
    energy: dict[str, Any] = {
        "joules": round(joules, 1),
        "kilowattHours": round(joules / JOULES_PER_KWH, KWH_DECIMALS),
        "source": total_source(before, added, initial_source),
        "accountedUntil": format_time(now),
        "tokensPerJoule": None if efficiency is None else float(f"{efficiency[0]:.3g}"),
        "tokensPerJouleSource": None if efficiency is None else efficiency[1],
    }
    if carbon is not None:
        grams = float(previous.get("carbonGrams") or 0.0)
        grams += (added.joules if added else 0.0) / JOULES_PER_KWH * pue * carbon.grams_per_kwh
        energy["carbonGrams"] = round(grams, 3)
    elif "carbonGrams" in previous:
        energy["carbonGrams"] = previous["carbonGrams"]
    return energy


def budget_energy(
    previous: Mapping[str, Any],
    added: Increment | None,
    *,
    now: datetime,
    terms: BudgetTerms,
    carbon: CarbonIntensity | None,
    initial_source: str,
) -> dict[str, Any]:
    """An EnergyBudget's period figures advanced to `now` (a new period starts from zero).

    `added` is None for an empty first increment (accounting starts now, as `initial_source`).
    `energyUsedJoules` is GPU energy times PUE; `carbonGrams` adds each increment's energy (times
    PUE) times the intensity of the moment it was accounted; `carbonIntensity` is that intensity.
    `energyUsedKilowattHours` and `carbonKg` are the same totals rounded for people. A status
    written before the joule and gram totals existed goes on from its kWh and kg.
    """
    start = format_time(period_start(now, terms.period))
    base = previous if previous.get("periodStart") == start else {}
    before = base.get("energySource")
    added_joules = (added.joules if added else 0.0) * terms.pue
    joules = (
        _total(base, "energyUsedJoules", "energyUsedKilowattHours", JOULES_PER_KWH) + added_joules
    )
    figures: dict[str, Any] = {
        "periodStart": start,
        "energyUsedJoules": round(joules, 1),
        "energyUsedKilowattHours": round(joules / JOULES_PER_KWH, KWH_DECIMALS),
        "energySource": total_source(before, added, initial_source),
        "accountedUntil": format_time(now),
        "carbonGrams": None,
        "carbonKg": None,
        "carbonIntensity": None,
    }
    if carbon is not None:
        grams = _total(base, "carbonGrams", "carbonKg", 1000.0)
        grams += added_joules / JOULES_PER_KWH * carbon.grams_per_kwh
        figures["carbonGrams"] = round(grams, 6)
        figures["carbonKg"] = round(grams / 1000, KG_DECIMALS)
        figures["carbonIntensity"] = {
            "gramsPerKilowattHour": round(carbon.grams_per_kwh, 1),
            "source": carbon.source,
        }
    return figures


def _total(base: Mapping[str, Any], field: str, rounded_field: str, per_rounded: float) -> float:
    """A running total from `field`, or from the rounded figure of an older status."""
    if base.get(field) is not None:
        return float(base[field])
    return float(base.get(rounded_field) or 0.0) * per_rounded

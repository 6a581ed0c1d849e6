"""Measured GPU power, energy and token rates from Prometheus, with staleness made explicit.

`TelemetryReader` queries Prometheus through prometheus-api-client and returns plain, immutable
readings the operator turns into status (`source: measured`) or, when Prometheus is down, slow or
has no fresh series, marks stale so the operator falls back on the model (`source: modelled`).
It never raises for telemetry problems.

Metric families accepted, in order of preference (the first one that has a node or pod wins):
- DCGM exporter (and the wattsched agent): `rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION[w])` (mJ/s ->
  W), then `avg_over_time(DCGM_FI_DEV_POWER_USAGE[w])` (W). Node from the `Hostname` or `hostname`
  label; pod from `pod`/`namespace` (or `exported_pod`/`exported_namespace` when Prometheus
  scraped without honor_labels).
- Kepler: `rate(kepler_pod_gpu_joules_total[w])` by `pod_name`/`pod_namespace`, and
  `avg_over_time(kepler_node_gpu_watts[w])` by `node_name`.
Energy over an interval is the difference of the counters' values at both ends, each taken from the
nearest sample and the local rate (`counter_increase`; `increase()` where a series reset or began
inside), or the mean of a power gauge times the interval when only a gauge exists. Tokens per
second come from a configurable query (default: vLLM's `vllm:generation_tokens_total`).

`Calibrator` keeps the bounded, smoothed correction factors (the optimizer's `Calibration`) that
turn the optimizer's modelled power/throughput into what is measured, per (product, workload
type); the operator hands them to `CatalogueModel.calibrated` and exports them as metrics.

Not for: writing status, deciding plans, or serving metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from wattsched_optimizer.model import (
    CALIBRATION_BOUNDS,
    Calibration,
    CatalogueModel,
    product_spec,
    sm_clock_effect,
)
from wattsched_optimizer.problem import Placement, WorkloadType

PodKey = tuple[str, str]  # (namespace, name)

DEFAULT_TOKEN_QUERY = "sum by (namespace, pod) (rate(vllm:generation_tokens_total[{window}]))"


class Source(StrEnum):
    """Where a figure came from (shown next to every W, J, tokens/J and gCO2)."""

    MEASURED = "measured"
    MODELLED = "modelled"


@dataclass(frozen=True)
class TelemetryConfig:
    """How to reach Prometheus and which queries to run.

    rate_window_seconds: the window of rate()/avg_over_time(); it should span at least four
    scrape intervals. A node with no sample in that window counts as missing (stale).
    token_query: PromQL returning tokens/s by `namespace` and `pod`; `{window}` is replaced by
    the rate window (e.g. `60s`). Empty: no token figures.
    """

    prometheus_url: str
    timeout_seconds: float = 5.0
    rate_window_seconds: int = 60
    token_query: str = DEFAULT_TOKEN_QUERY

    def __post_init__(self) -> None:
        if not self.prometheus_url.startswith(("http://", "https://")):
            raise ValueError(
                f"telemetry prometheusUrl={self.prometheus_url!r}: must be an http(s) URL"
            )
        if self.rate_window_seconds < 1:
            raise ValueError(
                f"telemetry rateWindowSeconds={self.rate_window_seconds}: must be >= 1"
            )


# ----- the queries ------------------------------------------------------------------------------

_DCGM_ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
_DCGM_POWER = "DCGM_FI_DEV_POWER_USAGE"


def _dcgm_node(expression: str) -> str:
    """`expression` with a `node` label from DCGM's `hostname` or `Hostname` (either spelling)."""
    inner = f'label_replace({expression}, "node", "$1", "hostname", "(.+)")'
    return f'label_replace({inner}, "node", "$1", "Hostname", "(.+)")'


def _dcgm_pod(expression: str) -> str:
    """`expression` with `pod`/`namespace` also taken from `exported_pod`/`exported_namespace`."""
    inner = f'label_replace({expression}, "pod", "$1", "exported_pod", "(.+)")'
    return f'label_replace({inner}, "namespace", "$1", "exported_namespace", "(.+)")'


def _kepler_pod(expression: str) -> str:
    inner = f'label_replace({expression}, "pod", "$1", "pod_name", "(.+)")'
    return f'label_replace({inner}, "namespace", "$1", "pod_namespace", "(.+)")'


def _kepler_node(expression: str) -> str:
    return f'label_replace({expression}, "node", "$1", "node_name", "(.+)")'


@dataclass(frozen=True)
class MetricQuery:
    """One way of measuring: a PromQL expression and the name it is reported under."""

    metric: str
    promql: str


def node_power_queries(window: str) -> tuple[MetricQuery, ...]:
    """Watts per node (label `node`), best first."""
    return (
        MetricQuery(
            f"rate({_DCGM_ENERGY})",
            f"sum by (node) ({_dcgm_node(f'rate({_DCGM_ENERGY}[{window}])')}) / 1000",
        ),
        MetricQuery(
            f"avg_over_time({_DCGM_POWER})",
            f"sum by (node) ({_dcgm_node(f'avg_over_time({_DCGM_POWER}[{window}])')})",
        ),
        MetricQuery(
            "avg_over_time(kepler_node_gpu_watts)",
            f"sum by (node) ({_kepler_node(f'avg_over_time(kepler_node_gpu_watts[{window}])')})",
        ),
    )


def pod_power_queries(window: str) -> tuple[MetricQuery, ...]:
    """Watts per pod (labels `namespace`, `pod`), best first."""
    return (
        MetricQuery(
            f"rate({_DCGM_ENERGY})",
            f"sum by (namespace, pod) ({_dcgm_pod(f'rate({_DCGM_ENERGY}[{window}])')}) / 1000",
        ),
        MetricQuery(
            f"avg_over_time({_DCGM_POWER})",
            f"sum by (namespace, pod) ({_dcgm_pod(f'avg_over_time({_DCGM_POWER}[{window}])')})",
        ),
        MetricQuery(
            "rate(kepler_pod_gpu_joules_total)",
            "sum by (namespace, pod) "
            f"({_kepler_pod(f'rate(kepler_pod_gpu_joules_total[{window}])')})",
        ),
    )


# An energy counter's value at a moment is its last sample before it plus the local rate (the
# last two samples, `irate`) times the sample's age. Local, because `increase()` extrapolates a
# window's edges with the window's average rate: wrong by up to one scrape interval of the
# difference whenever the load changed inside the window. The lookback bounds the last sample's age.
_COUNTER_LOOKBACK = "5m"


def counter_value_at(counter: str, at_seconds: float) -> str:
    """PromQL for each series of `counter` at the Unix time `at_seconds` (Prometheus 2.33+)."""
    at = f"@ {at_seconds:.3f}"
    return (
        f"({counter} {at} + irate({counter}[{_COUNTER_LOOKBACK}] {at})"
        f" * ({at_seconds:.3f} - timestamp({counter} {at})))"
    )


# The labels that say which pod holds a GPU. A GPU's counter series changes with them (a new pod
# is a new series), so a node's energy first joins the pieces of each GPU's counter.
_POD_LABELS = (
    "pod",
    "namespace",
    "container",
    "exported_pod",
    "exported_namespace",
    "exported_container",
)


def counter_increase(
    counter: str, start_seconds: float, end_seconds: float, ignoring: tuple[str, ...] = ()
) -> str:
    """PromQL for each series' increase of `counter` between two Unix times.

    The difference of the series' values at both ends (`counter_value_at`) where the series has a
    value at both and did not reset in between; otherwise (a series that began inside the interval,
    e.g. a pod's GPU, or an agent restart) Prometheus's `increase()`, which handles both. Series
    that differ only in the `ignoring` labels count as one counter (its pieces over time).
    """
    range_seconds = max(1, round(end_seconds - start_seconds))
    at_end = f"[{range_seconds}s] @ {end_seconds:.3f}"

    def joined(expression: str, how: str = "max") -> str:
        return f"{how} without ({', '.join(ignoring)}) ({expression})" if ignoring else expression

    difference = (
        f"({joined(counter_value_at(counter, end_seconds))}"
        f" - {joined(counter_value_at(counter, start_seconds))})"
    )
    resets = f"({joined(f'resets({counter}{at_end})')} > 0)"
    increase = joined(f"increase({counter}{at_end})", "sum")
    return f"(({difference} unless {resets}) or {increase})"


def node_energy_queries(start_seconds: float, end_seconds: float) -> tuple[MetricQuery, ...]:
    """Joules per node between two Unix times, best first."""
    range_seconds = max(1, round(end_seconds - start_seconds))

    def mean(gauge: str) -> str:
        return f"avg_over_time({gauge}[{range_seconds}s] @ {end_seconds:.3f})"

    dcgm = counter_increase(_DCGM_ENERGY, start_seconds, end_seconds, _POD_LABELS)
    return (
        MetricQuery(
            f"increase({_DCGM_ENERGY})",
            f"sum by (node) ({_dcgm_node(dcgm)}) / 1000",
        ),
        MetricQuery(
            f"avg_over_time({_DCGM_POWER}) * seconds",
            f"sum by (node) ({_dcgm_node(mean(_DCGM_POWER))}) * {range_seconds}",
        ),
        MetricQuery(
            "avg_over_time(kepler_node_gpu_watts) * seconds",
            f"sum by (node) ({_kepler_node(mean('kepler_node_gpu_watts'))}) * {range_seconds}",
        ),
    )


def pod_energy_queries(start_seconds: float, end_seconds: float) -> tuple[MetricQuery, ...]:
    """Joules per pod between two Unix times, best first."""
    dcgm = counter_increase(_DCGM_ENERGY, start_seconds, end_seconds)
    kepler = counter_increase("kepler_pod_gpu_joules_total", start_seconds, end_seconds)
    return (
        MetricQuery(
            f"increase({_DCGM_ENERGY})",
            f"sum by (namespace, pod) ({_dcgm_pod(dcgm)}) / 1000",
        ),
        MetricQuery(
            "increase(kepler_pod_gpu_joules_total)",
            f"sum by (namespace, pod) ({_kepler_pod(kepler)})",
        ),
    )


# ----- the readings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """A measured value and the metric it came from."""

    value: float
    metric: str


@dataclass(frozen=True)
class TelemetrySnapshot:
    """Power and token rates at `time`.

    stale: Prometheus did not answer (`unavailable`), or none of the requested nodes has a fresh
    series; `reason` says which. `source` is MEASURED when at least one requested node was
    measured. Nodes and pods without data are absent from the maps (and listed in
    `missing_nodes`): use the model for them.
    """

    time: datetime
    source: Source
    stale: bool
    reason: str
    node_watts: Mapping[str, Measurement] = field(default_factory=dict)
    pod_watts: Mapping[PodKey, Measurement] = field(default_factory=dict)
    pod_tokens_per_second: Mapping[PodKey, float] = field(default_factory=dict)
    missing_nodes: frozenset[str] = frozenset()
    unavailable: bool = False

    def tokens_per_joule(self, pod: PodKey) -> float | None:
        """Tokens per joule of a pod (tokens/s over W), when both are measured."""
        tokens = self.pod_tokens_per_second.get(pod)
        power = self.pod_watts.get(pod)
        if tokens is None or power is None or power.value <= 0:
            return None
        return tokens / power.value


@dataclass(frozen=True)
class EnergyReading:
    """Energy (J) used between `start` and `end`; same staleness rules as `TelemetrySnapshot`."""

    start: datetime
    end: datetime
    source: Source
    stale: bool
    reason: str
    node_joules: Mapping[str, Measurement] = field(default_factory=dict)
    pod_joules: Mapping[PodKey, Measurement] = field(default_factory=dict)
    missing_nodes: frozenset[str] = frozenset()


class PrometheusUnavailableError(Exception):
    """Prometheus did not answer (internal: turned into a stale reading, never raised out)."""


def _first_by_key(
    results: Iterable[tuple[str, list[dict[str, Any]]]],
    key_of: Callable[[Mapping[str, str]], Any],
) -> dict[Any, Measurement]:
    """Merge query results, keeping for each key the value of the first query that has it."""
    merged: dict[Any, Measurement] = {}
    for metric, rows in results:
        for row in rows:
            key = key_of(row.get("metric") or {})
            value = float(row["value"][1])
            if key is None or key in merged or math.isnan(value) or math.isinf(value):
                continue
            merged[key] = Measurement(value, metric)
    return merged


def _node_key(labels: Mapping[str, str]) -> str | None:
    return labels.get("node") or None


def _pod_key(labels: Mapping[str, str]) -> PodKey | None:
    namespace, pod = labels.get("namespace"), labels.get("pod")
    return (namespace, pod) if namespace and pod else None


class TelemetryReader:
    """Reads measured power, energy and token rates; stale instead of failing."""

    def __init__(self, config: TelemetryConfig, client: PrometheusConnect | None = None) -> None:
        self.config = config
        self.client = client or PrometheusConnect(
            url=config.prometheus_url,
            disable_ssl=False,
            retry=Retry(total=1, backoff_factor=0.1, status_forcelist=[502, 503, 504]),
            timeout=config.timeout_seconds,
        )

    @property
    def window(self) -> str:
        return f"{self.config.rate_window_seconds}s"

    def _query(self, promql: str, at: datetime | None = None) -> list[dict[str, Any]]:
        params = {} if at is None else {"time": f"{at.timestamp():.3f}"}
        try:
            rows: list[dict[str, Any]] = self.client.custom_query(promql, params=params)
        except (requests.RequestException, PrometheusApiClientException, ValueError) as error:
            raise PrometheusUnavailableError(
                f"Prometheus at {self.config.prometheus_url} did not answer: {error}"
            ) from error
        return rows

    def _run(
        self, queries: Iterable[MetricQuery], at: datetime | None = None
    ) -> list[tuple[str, list[dict[str, Any]]]]:
        return [(query.metric, self._query(query.promql, at)) for query in queries]

    @staticmethod
    def _staleness(
        nodes: frozenset[str], measured: Mapping[str, Measurement], window: str
    ) -> tuple[frozenset[str], bool, str, Source]:
        missing = frozenset(nodes - set(measured))
        if nodes and missing == nodes:
            return (
                missing,
                True,
                f"no GPU power series in the last {window} for any of {len(nodes)} node(s) "
                f"(e.g. {sorted(missing)[0]}): is the agent or DCGM exporter being scraped?",
                Source.MODELLED,
            )
        reason = f"no fresh series for {sorted(missing)}" if missing else ""
        return missing, False, reason, Source.MEASURED

    def read(self, nodes: Iterable[str], pods: Iterable[PodKey] = ()) -> TelemetrySnapshot:
        """Current watts per node and per pod, and tokens/s per pod (over the rate window)."""
        now = datetime.now(UTC)
        wanted_nodes = frozenset(nodes)
        wanted_pods = frozenset(pods)
        try:
            node_watts = _first_by_key(self._run(node_power_queries(self.window)), _node_key)
            pod_watts = _first_by_key(self._run(pod_power_queries(self.window)), _pod_key)
            tokens: dict[PodKey, float] = {}
            if self.config.token_query:
                token_query = self.config.token_query.replace("{window}", self.window)
                token_rows = _first_by_key([("tokens", self._query(token_query))], _pod_key)
                tokens = {key: reading.value for key, reading in token_rows.items()}
        except PrometheusUnavailableError as error:
            return TelemetrySnapshot(now, Source.MODELLED, True, str(error), unavailable=True)
        missing, stale, reason, source = self._staleness(wanted_nodes, node_watts, self.window)
        return TelemetrySnapshot(
            time=now,
            source=source,
            stale=stale,
            reason=reason,
            node_watts={name: node_watts[name] for name in wanted_nodes & set(node_watts)},
            pod_watts={key: pod_watts[key] for key in wanted_pods & set(pod_watts)},
            pod_tokens_per_second={key: tokens[key] for key in wanted_pods & set(tokens)},
            missing_nodes=missing,
        )

    def energy(
        self,
        nodes: Iterable[str],
        pods: Iterable[PodKey] = (),
        *,
        start: datetime,
        end: datetime | None = None,
    ) -> EnergyReading:
        """Joules used per node and per pod between `start` and `end` (default: now)."""
        end = end or datetime.now(UTC)
        range_seconds = max(1, round((end - start).total_seconds()))
        wanted_nodes = frozenset(nodes)
        wanted_pods = frozenset(pods)
        try:
            span = (start.timestamp(), end.timestamp())
            node_rows = self._run(node_energy_queries(*span), end)
            pod_rows = self._run(pod_energy_queries(*span), end)
        except PrometheusUnavailableError as error:
            return EnergyReading(start, end, Source.MODELLED, True, str(error))
        node_joules = _first_by_key(node_rows, _node_key)
        pod_joules = _first_by_key(pod_rows, _pod_key)
        missing, stale, reason, source = self._staleness(
            wanted_nodes, node_joules, f"{range_seconds}s"
        )
        return EnergyReading(
            start=start,
            end=end,
            source=source,
            stale=stale,
            reason=reason,
            node_joules={name: node_joules[name] for name in wanted_nodes & set(node_joules)},
            pod_joules={key: pod_joules[key] for key in wanted_pods & set(pod_joules)},
            missing_nodes=missing,
        )

    def scalar(self, promql: str) -> float | None:
        """The value of a one-series query (e.g. a carbon intensity in gCO2/kWh); None if absent,
        ambiguous or Prometheus is unavailable."""
        try:
            rows = self._query(promql)
        except PrometheusUnavailableError:
            return None
        if len(rows) != 1:
            return None
        value = float(rows[0]["value"][1])
        return None if math.isnan(value) or math.isinf(value) else value


# ----- calibration ------------------------------------------------------------------------------

CalibrationKey = tuple[str, WorkloadType]  # (normalised product, workload type)


@dataclass(frozen=True)
class CalibrationSample:
    """One replica's measured figures next to what the *uncalibrated* model predicted for it.

    Compare with the uncalibrated model (`CatalogueModel()`), not the corrected one, or each
    correction would be applied on top of the last. Per GPU: watts; per replica: tokens/s.
    """

    product: str
    workload_type: WorkloadType
    modelled_watts_per_gpu: float | None
    measured_watts_per_gpu: float | None
    modelled_tokens_per_second: float | None = None
    measured_tokens_per_second: float | None = None


class Calibrator:
    """Exponentially smoothed, bounded correction factors per (product, workload type).

    Each sample moves a factor `smoothing` of the way towards measured/modelled; factors stay in
    the optimizer's CALIBRATION_BOUNDS, so one bad reading cannot make the model absurd. A sample
    from stale telemetry must not be given (the caller checks `TelemetrySnapshot.stale`).
    """

    def __init__(self, smoothing: float = 0.2) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"calibration smoothing={smoothing}: must be in (0, 1]")
        self.smoothing = smoothing
        self._factors: dict[CalibrationKey, Calibration] = {}
        self._samples: dict[CalibrationKey, int] = {}

    @staticmethod
    def _bounded_ratio(measured: float | None, modelled: float | None) -> float | None:
        if measured is None or modelled is None or modelled <= 0 or measured < 0:
            return None
        low, high = CALIBRATION_BOUNDS
        return min(max(measured / modelled, low), high)

    def _smoothed(self, old: float, ratio: float | None) -> float:
        return old if ratio is None else old + self.smoothing * (ratio - old)

    def observe(self, sample: CalibrationSample) -> Calibration:
        """Fold one sample in; returns the key's new correction."""
        key = (sample.product, sample.workload_type)
        old = self._factors.get(key, Calibration())
        power = self._bounded_ratio(sample.measured_watts_per_gpu, sample.modelled_watts_per_gpu)
        throughput = self._bounded_ratio(
            sample.measured_tokens_per_second, sample.modelled_tokens_per_second
        )
        new = Calibration(
            throughput_factor=self._smoothed(old.throughput_factor, throughput),
            power_factor=self._smoothed(old.power_factor, power),
        ).bounded()
        self._factors[key] = new
        self._samples[key] = self._samples.get(key, 0) + 1
        return new

    def corrections(self) -> dict[CalibrationKey, Calibration]:
        """The current factors, for `CatalogueModel.calibrated` and for metrics."""
        return dict(self._factors)

    def sample_count(self, key: CalibrationKey) -> int:
        return self._samples.get(key, 0)


# A GPU drawing this close to its limit is held by the limit, not by its work: its draw says
# nothing about the model's demand, so it is no power sample.
_LIMIT_BOUND_FRACTION = 0.97


def calibration_samples(
    placements: Iterable[Placement],
    *,
    pods: Mapping[tuple[str, int], PodKey],
    products: Mapping[str, str],
    types: Mapping[str, WorkloadType],
    demands: Mapping[str, float],
    snapshot: TelemetrySnapshot,
    corrections: Mapping[CalibrationKey, Calibration],
) -> list[CalibrationSample]:
    """One sample per placed single-node replica whose running pod a fresh reading measured.

    pods: (workload key, replica) -> the replica's running pod; products: node -> normalised
    product; types: workload key -> type; demands: Inference workload key -> the tokens/s its
    spec declares; corrections: the factors the plan was made with (the modelled throughput is
    divided by them to compare with the uncalibrated model).
    Power is sampled only when neither the draw nor the model is held by the power limit. A replica
    with locked SM clocks is compared with the model's locked draw (the unlocked busy draw times
    the clock curve's draw fraction, as the optimizer planned it), so the correction stays one of
    the unlocked model, and a clock curve that is off shows up in it for that (product, type).
    Throughput (measured tokens/s, from the token query) is sampled where it shows capacity:
    Training, FineTuning and BatchInference run flat out, always. An Inference replica serves its
    share of the demand, not what it could, so only (a) when the workload is saturated (its
    declared demand is at least the planned replicas' expected tokens/s: every replica runs at
    capacity), or (b) when a replica serves more than the calibrated model says it can (a lower
    bound on its capacity above the model). Otherwise low traffic would read as slow GPUs.
    """
    if snapshot.stale:
        return []
    placed = list(placements)
    planned_tokens_per_second: dict[str, float] = {}
    for placement in placed:
        planned = planned_tokens_per_second.get(placement.workload, 0.0)
        planned_tokens_per_second[placement.workload] = planned + placement.expected_throughput
    base = CatalogueModel()
    samples: list[CalibrationSample] = []
    for placement in placed:
        if placement.nodes_per_replica > 1:
            continue  # a replica spanning nodes: its pods share its work (no per-pod sample)
        pod = pods.get((placement.workload, placement.replica))
        product = products.get(placement.node)
        workload_type = types.get(placement.workload)
        measured = snapshot.pod_watts.get(pod) if pod else None
        if pod is None or product is None or workload_type is None or measured is None:
            continue
        limit = placement.power_limit_watts
        modelled = base.expected_power_watts(product, workload_type, limit)
        if placement.sm_clock_mhz is not None:
            unlocked = base.expected_power_watts(
                product, workload_type, product_spec(product).max_watts.value
            )
            _, draw_fraction = sm_clock_effect(product, workload_type, placement.sm_clock_mhz)
            modelled = max(base.idle_power_watts(product), unlocked * draw_fraction)
        per_gpu = measured.value / max(placement.gpus, 1)
        bound = _LIMIT_BOUND_FRACTION * limit
        power_sampled = per_gpu < bound and modelled < bound
        tokens = snapshot.pod_tokens_per_second.get(pod)
        if tokens is not None and not workload_type.is_gang:
            demand = demands.get(placement.workload)
            saturated = (
                demand is not None and demand >= planned_tokens_per_second[placement.workload]
            )
            if not saturated and tokens <= placement.expected_throughput:
                tokens = None
        factor = corrections.get((product, workload_type), Calibration()).throughput_factor
        if not power_sampled and tokens is None:
            continue
        samples.append(
            CalibrationSample(
                product=product,
                workload_type=workload_type,
                modelled_watts_per_gpu=modelled if power_sampled else None,
                measured_watts_per_gpu=per_gpu if power_sampled else None,
                modelled_tokens_per_second=placement.expected_throughput / factor
                if tokens is not None
                else None,
                measured_tokens_per_second=tokens,
            )
        )
    return samples

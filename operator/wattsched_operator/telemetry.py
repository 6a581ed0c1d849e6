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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from wattsched_api.vocabulary import DCGM_ENERGY_METRIC, Source
from wattsched_operator.readings import (
    CalibrationSample,
    Calibrator,
    EnergyReading,
    Measurement,
    PodKey,
    TelemetrySnapshot,
    calibration_samples,
)

# The readings and calibration moved to the pure `readings` module; they are re-exported here.
__all__ = [
    "CalibrationSample",
    "Calibrator",
    "EnergyReading",
    "Measurement",
    "PodKey",
    "Source",
    "TelemetrySnapshot",
    "calibration_samples",
]

DEFAULT_TOKEN_QUERY = "sum by (namespace, pod) (rate(vllm:generation_tokens_total[{window}]))"
# The highest 30-s rate of vLLM's generation counter within the rate window, at 15-s steps (two
# samples at Prometheus' usual 15-s scrape): the bursts a mean over the whole window hides.
DEFAULT_PEAK_TOKEN_QUERY = (
    "max_over_time(sum by (namespace, pod) (rate(vllm:generation_tokens_total[30s]))[{window}:15s])"
)
# vLLM's queue as tokens: its waiting requests (the `vllm:num_requests_waiting` gauge) times the
# generation tokens per finished request over the rate window (`vllm:generation_tokens_total`
# over `vllm:request_success_total`). Where no request finished in the window the ratio is not a
# number and the pod has no queue figure.
DEFAULT_QUEUE_QUERY = (
    "sum by (namespace, pod) (vllm:num_requests_waiting)"
    " * on (namespace, pod) ("
    "sum by (namespace, pod) (rate(vllm:generation_tokens_total[{window}]))"
    " / sum by (namespace, pod) (rate(vllm:request_success_total[{window}])))"
)


@dataclass(frozen=True)
class TelemetryConfig:
    """How to reach Prometheus and which queries to run.

    rate_window_seconds: the window of rate()/avg_over_time(); it should span at least four
    scrape intervals. A node with no sample in that window counts as missing (stale).
    token_query: PromQL returning tokens/s by `namespace` and `pod`; `{window}` is replaced by
    the rate window (e.g. `60s`). Empty: no token figures.
    peak_token_query: PromQL returning, by `namespace` and `pod`, the highest short-window tokens/s
    within the rate window (`{window}` as above); it sizes services. Empty: the token query's
    mean stands in.
    queue_query: PromQL returning, by `namespace` and `pod`, the tokens waiting to be served (the
    demand the pod has not served yet); `{window}` as above. Empty: no queue figures (services are
    then sized from their served tokens/s alone).
    """

    prometheus_url: str
    timeout_seconds: float = 5.0
    rate_window_seconds: int = 60
    token_query: str = DEFAULT_TOKEN_QUERY
    peak_token_query: str = DEFAULT_PEAK_TOKEN_QUERY
    queue_query: str = DEFAULT_QUEUE_QUERY

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

_DCGM_ENERGY = DCGM_ENERGY_METRIC
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
        """Current watts per node and per pod, tokens/s per pod (the rate window's mean and its
        short-window peak) and the tokens waiting in each pod's queue."""
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
            peaks: dict[PodKey, float] = {}
            if self.config.peak_token_query:
                peak_query = self.config.peak_token_query.replace("{window}", self.window)
                peak_rows = _first_by_key([("peak", self._query(peak_query))], _pod_key)
                peaks = {key: reading.value for key, reading in peak_rows.items()}
            queued: dict[PodKey, float] = {}
            if self.config.queue_query:
                queue_query = self.config.queue_query.replace("{window}", self.window)
                queue_rows = _first_by_key([("queue", self._query(queue_query))], _pod_key)
                queued = {key: max(0.0, reading.value) for key, reading in queue_rows.items()}
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
            pod_peak_tokens_per_second={key: peaks[key] for key in wanted_pods & set(peaks)},
            pod_queued_tokens={key: queued[key] for key in wanted_pods & set(queued)},
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

    def samples(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """Every series of a query as (labels, value), e.g. a carbon forecast with one series per
        hour ahead; empty if Prometheus is unavailable. Values that are not finite are left out."""
        try:
            rows = self._query(promql)
        except PrometheusUnavailableError:
            return []
        out = []
        for row in rows:
            value = float(row["value"][1])
            if not (math.isnan(value) or math.isinf(value)):
                out.append(({str(k): str(v) for k, v in (row.get("metric") or {}).items()}, value))
        return out

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

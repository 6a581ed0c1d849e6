"""Request traces -> per-service token demand per simulation step.

Reads the Azure LLM inference traces (Patel et al., "Splitwise: Efficient generative LLM inference
using phase splitting", ISCA 2024; Azure Public Dataset, CC-BY 4.0) or any CSV with the same
columns (`TIMESTAMP`, `ContextTokens`, `GeneratedTokens`). The files are read in place, from
`../shared/data/azure-llm-inference-2023/` beside the checkout unless a path is given; nothing is
copied into the repository.

Demand is counted in *decode-equivalent tokens*: generated tokens plus prompt tokens times
`PROMPT_TOKEN_WEIGHT`, because a prompt token costs far less GPU time than a generated one (prefill
is compute-bound and batched; Splitwise measures prefill throughput in the thousands of tokens/s
per GPU against hundreds for decode).

Runs longer than a trace (several days of the one-hour Azure traces) repeat it back to back: copy
k is the trace shifted by k times its span rounded up to whole hours. A demand profile then
shapes the repeated trace over the day: `DIURNAL_PROFILE` multiplies the demand of each step by
the figure of its hour of day (simulation time 0 is midnight UTC, `observed.EPOCH`);
`FLAT_PROFILE` (the default) leaves it as
recorded. Not for: per-request latency (the simulator is a fluid model at step granularity; see
`engine`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

PROMPT_TOKEN_WEIGHT = 0.1
TRACE_ATTRIBUTION = "Azure LLM inference trace 2023 (Patel et al., Splitwise, ISCA 2024), CC-BY 4.0"
DEFAULT_TRACE_DIR = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "azure-llm-inference-2023"
)
DEFAULT_TRACE_FILES = ("code.csv", "conv.csv")

FloatArray = npt.NDArray[np.float64]
# Demand kept from before t = 0 (the trace continued backwards), for the telemetry a run starts
# with (`engine.Simulation._prefill_telemetry`).
HISTORY_SECONDS = 600.0

# Demand multiplier per hour of day (UTC), for `--demand-profile diurnal`. An assumed shape, not a
# measured one: low at night (0.45 of the mean hour at 03:00-05:00), rising through the morning to
# a plateau of ~1.5 from 11:00 to 17:00 and falling through the evening; the 24 figures average
# 1.0, so a day carries the recorded trace's mean demand. It follows the qualitative pattern of
# week-long production LLM inference traces (the Azure LLM inference trace 2024, which a one-hour
# 2023 trace lacks: daytime peaks, night troughs); the peak-to-trough ratio (3.3x) is ours.
DIURNAL_PROFILE: tuple[float, ...] = (
    0.55, 0.5, 0.47, 0.45, 0.45, 0.5, 0.6, 0.8, 1.0, 1.2, 1.37, 1.47,
    1.5, 1.5, 1.5, 1.47, 1.43, 1.37, 1.29, 1.18, 1.08, 0.92, 0.76, 0.64,
)  # fmt: skip
FLAT_PROFILE: tuple[float, ...] = (1.0,) * 24
DEMAND_PROFILES = {"flat": FLAT_PROFILE, "diurnal": DIURNAL_PROFILE}


class TraceError(ValueError):
    """A trace file is missing or malformed; the message names the file, line and column."""


@dataclass(frozen=True)
class Request:
    arrival_seconds: float  # since the trace's first request
    context_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class ServiceTrace:
    """Demand of one inference service: decode-equivalent tokens arriving in each step."""

    name: str
    source: str
    requests: int
    step_seconds: float
    demand_tokens: FloatArray
    # The steps before t = 0, oldest first (the last entry is the step just before t = 0): the
    # same requests wrapped around the trace's span, as `demand_per_step` wraps them after it.
    history_tokens: FloatArray = field(default_factory=lambda: np.zeros(0))

    @property
    def mean_tokens_per_second(self) -> float:
        return float(self.demand_tokens.sum()) / (len(self.demand_tokens) * self.step_seconds)


def default_trace_paths() -> list[Path]:
    return [DEFAULT_TRACE_DIR / name for name in DEFAULT_TRACE_FILES]


def _parse_timestamp(text: str, where: str) -> datetime:
    # The Azure files carry 7 fractional digits; datetime takes at most 6.
    head, dot, fraction = text.strip().partition(".")
    try:
        moment = datetime.fromisoformat(head)
    except ValueError as error:
        raise TraceError(f"{where}: TIMESTAMP={text!r} is not 'YYYY-MM-DD HH:MM:SS[.f]'") from error
    if dot:
        digits = (fraction + "000000")[:6]
        if not digits.isdigit():
            raise TraceError(f"{where}: TIMESTAMP={text!r} has a malformed fraction")
        moment = moment.replace(microsecond=int(digits))
    return moment


def read_requests(path: Path) -> tuple[datetime, list[Request]]:
    """Read a trace CSV; returns its first arrival time and the requests relative to it."""
    if not path.is_file():
        raise TraceError(f"trace {path}: no such file (pass --trace PATH)")
    rows: list[tuple[datetime, int, int]] = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or [])
        if missing:
            raise TraceError(f"trace {path}: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            where = f"trace {path} line {line}"
            moment = _parse_timestamp(row["TIMESTAMP"], where)
            try:
                context, generated = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except ValueError as error:
                raise TraceError(f"{where}: token counts must be integers") from error
            if context < 0 or generated < 0:
                raise TraceError(f"{where}: token counts must be >= 0")
            rows.append((moment, context, generated))
    if not rows:
        raise TraceError(f"trace {path}: no requests")
    rows.sort(key=lambda row: row[0])
    start = rows[0][0]
    return start, [
        Request((moment - start).total_seconds(), context, generated)
        for moment, context, generated in rows
    ]


def demand_per_step(
    requests: list[Request],
    *,
    offset_seconds: float,
    duration_seconds: float,
    step_seconds: float,
    rate_scale: float,
    seed: int,
    history_seconds: float = 0.0,
    trace_span_seconds: float | None = None,
    hourly_profile: tuple[float, ...] = FLAT_PROFILE,
) -> tuple[FloatArray, FloatArray]:
    """Bin requests into steps, scaled to `rate_scale` times the recorded request rate.

    Scaling superimposes copies of the trace, each shifted by a seeded random offset (wrapping
    around the trace's span), and a thinned copy for the fractional part. This keeps the recorded
    request sizes and makes a busier service smoother, as aggregating independent users would.
    A run longer than `trace_span_seconds` repeats the scaled trace back to back (copy k shifted
    by k spans); then each step's demand is multiplied by `hourly_profile`'s figure for
    its hour of day. Returns the demand of the run's steps and of the `history_seconds` before
    t = 0 (the same copies one span earlier: the wrapped trace continued backwards, shaped by the
    profile's hours before midnight), oldest first.
    """
    if rate_scale <= 0:
        raise ValueError(f"--rate-scale={rate_scale}: must be > 0")
    steps = max(1, round(duration_seconds / step_seconds))
    history_steps = round(history_seconds / step_seconds)
    if len(hourly_profile) != 24 or min(hourly_profile) < 0:
        raise ValueError("a demand profile has 24 hourly multipliers >= 0")
    arrivals = np.array([r.arrival_seconds for r in requests]) + offset_seconds
    tokens = np.array(
        [r.generated_tokens + PROMPT_TOKEN_WEIGHT * r.context_tokens for r in requests]
    )
    span = max(float(arrivals.max()) + step_seconds, duration_seconds)
    repeats = 1
    if trace_span_seconds is not None and duration_seconds > trace_span_seconds:
        span = trace_span_seconds
        repeats = int(np.ceil(duration_seconds / span))
    # The history's steps, then the run's: copy -1 of the trace is the history.
    demand = np.zeros(history_steps + steps)
    rng = np.random.default_rng(seed)
    copies = int(np.ceil(rate_scale))
    for copy in range(copies):
        shift = 0.0 if copy == 0 else float(rng.uniform(0, span))
        keep = np.ones(len(tokens), dtype=bool)
        fraction = rate_scale - copy
        if fraction < 1:
            keep = rng.uniform(size=len(tokens)) < fraction
        times = (arrivals[keep] + shift) % span
        for repeat in range(-1, repeats):
            index = np.floor((times + repeat * span) / step_seconds).astype(np.int64)
            index += history_steps
            inside = (index >= 0) & (index < len(demand))
            np.add.at(demand, index[inside], tokens[keep][inside])
    profile = np.asarray(hourly_profile, dtype=np.float64)
    step_of_run = np.arange(len(demand)) - history_steps
    hour_of_day = (step_of_run * step_seconds // 3600).astype(np.int64) % 24
    shaped = demand * profile[hour_of_day]
    return shaped[history_steps:], shaped[:history_steps]


def load_traces(
    paths: list[Path],
    *,
    duration_seconds: float,
    step_seconds: float,
    rate_scale: float,
    seed: int,
    hourly_profile: tuple[float, ...] = FLAT_PROFILE,
) -> list[ServiceTrace]:
    """Load every trace on one clock: t = 0 is the earliest request across all files. A run
    longer than the traces' span rounded up to whole hours repeats them all with that period."""
    loaded = [(path, *read_requests(path)) for path in paths]
    origin = min(start for _, start, _ in loaded)
    last = max(
        (start - origin).total_seconds() + requests[-1].arrival_seconds
        for _, start, requests in loaded
    )
    # Whole hours (the Azure hour holds 3,513 s of requests: each copy then starts on the hour,
    # after ~1.5 min with no new requests), so that copies keep to the hours of the day.
    trace_span = float(np.ceil((last + step_seconds) / 3600.0) * 3600.0)
    traces = []
    for index, (path, start, requests) in enumerate(loaded):
        demand, history = demand_per_step(
            requests,
            offset_seconds=(start - origin).total_seconds(),
            duration_seconds=duration_seconds,
            step_seconds=step_seconds,
            rate_scale=rate_scale,
            seed=seed * 1000 + index,
            history_seconds=HISTORY_SECONDS,
            trace_span_seconds=trace_span,
            hourly_profile=hourly_profile,
        )
        traces.append(
            ServiceTrace(path.stem, str(path), len(requests), step_seconds, demand, history)
        )
    names = [trace.name for trace in traces]
    if len(set(names)) != len(names):
        raise TraceError(f"--trace: file names must differ (services are named by file): {names}")
    return traces

"""`wattsched operator`'s command line -> its telemetry settings (no cluster, no Prometheus)."""

from __future__ import annotations

import pytest

from wattsched_operator import run
from wattsched_operator.run import parse_args, telemetry_config
from wattsched_operator.telemetry import DEFAULT_TOKEN_QUERY

PROMETHEUS = ["--prometheus-url", "http://prometheus.monitoring.svc:9090"]


def test_tokens_query_flag_reaches_the_telemetry_config() -> None:
    query = 'sum by (namespace, pod) (rate(sglang:generation_tokens_total{job="sglang"}[{window}]))'
    config = telemetry_config(parse_args([*PROMETHEUS, "--tokens-query", query]))
    assert config is not None
    assert config.token_query == query
    assert config.prometheus_url == PROMETHEUS[1]


def test_tokens_query_defaults_to_vllms_counter() -> None:
    config = telemetry_config(parse_args([*PROMETHEUS, "--telemetry-window-seconds", "120"]))
    assert config is not None
    assert (config.token_query, config.rate_window_seconds) == (DEFAULT_TOKEN_QUERY, 120)


def test_empty_tokens_query_turns_token_figures_off() -> None:
    config = telemetry_config(parse_args([*PROMETHEUS, "--tokens-query="]))
    assert config is not None
    assert config.token_query == ""


def test_no_prometheus_url_means_no_telemetry() -> None:
    assert telemetry_config(parse_args([])) is None


def test_tokens_query_without_prometheus_url_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--tokens-query", "sum(rate(x[{window}]))"])
    assert "--tokens-query needs --prometheus-url" in capsys.readouterr().err


def test_bad_prometheus_url_is_refused_naming_the_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--prometheus-url", "prometheus:9090"])
    assert "prometheusUrl='prometheus:9090': must be an http(s) URL" in capsys.readouterr().err


def test_an_agent_is_lost_after_30_seconds_by_default_three_missed_heartbeats() -> None:
    assert parse_args([]).heartbeat_timeout_seconds == 30.0
    assert parse_args(["--heartbeat-timeout-seconds", "12"]).heartbeat_timeout_seconds == 12.0


@pytest.mark.parametrize("seconds", ["0", "-5", "inf", "nan"])
def test_a_heartbeat_timeout_that_is_not_a_positive_number_is_refused(
    seconds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--heartbeat-timeout-seconds", seconds])
    assert "--heartbeat-timeout-seconds=" in capsys.readouterr().err


def test_the_horizon_is_a_day_by_default_and_0_plans_one_instant() -> None:
    assert parse_args([]).horizon_hours == 24.0
    assert parse_args(["--horizon-hours", "0"]).horizon_hours == 0.0


@pytest.mark.parametrize("hours", ["-1", "169", "nan"])
def test_a_horizon_outside_0_to_a_week_is_refused_naming_the_flag(
    hours: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--horizon-hours", hours])
    assert f"--horizon-hours={float(hours):g}: must be from 0" in capsys.readouterr().err


def test_queue_and_peak_queries_reach_the_telemetry_config() -> None:
    queue = "sum by (namespace, pod) (sglang:num_queue_reqs) * 250"
    config = telemetry_config(
        parse_args([*PROMETHEUS, "--queue-query", queue, "--peak-tokens-query="])
    )
    assert config is not None
    assert (config.queue_query, config.peak_token_query) == (queue, "")
    default = telemetry_config(parse_args(PROMETHEUS))
    assert default is not None
    assert "vllm:num_requests_waiting" in default.queue_query
    assert "max_over_time" in default.peak_token_query


@pytest.mark.parametrize("flag", ["--queue-query", "--peak-tokens-query"])
def test_queue_and_peak_queries_without_prometheus_url_are_refused(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args([flag, "sum(x)"])
    assert f"{flag} needs --prometheus-url" in capsys.readouterr().err


def test_demand_check_seconds_is_parsed_and_a_negative_one_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert parse_args([]).demand_check_seconds == 15.0
    assert parse_args(["--demand-check-seconds", "0"]).demand_check_seconds == 0.0
    with pytest.raises(SystemExit):
        parse_args(["--demand-check-seconds", "-1"])
    assert "--demand-check-seconds=-1: must be a number of seconds >= 0" in (
        capsys.readouterr().err
    )


def test_the_operator_limits_its_malloc_arenas_before_anything_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def parse_args(argv: list[str]) -> None:
        calls.append("parse")
        raise SystemExit(2)

    monkeypatch.setattr(run, "limit_malloc_arenas", lambda: calls.append("limit"))
    monkeypatch.setattr(run, "parse_args", parse_args)
    with pytest.raises(SystemExit):
        run.main([])
    assert calls == ["limit", "parse"]

"""EnergyBudget allowance periods (`wattsched_api.energybudget.period_start`, `period_end`): UTC
calendar days, ISO weeks and months, as the operator's accounting and horizon plan, the CLI's
`wattsched status` and the simulator's report all count them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from wattsched_api.energybudget import Period, period_end, period_start

NOW = datetime(2026, 11, 25, 12, 0, 30, tzinfo=UTC)  # a Wednesday


def test_periods_start_at_utc_midnight_of_the_day_the_iso_week_and_the_month() -> None:
    assert period_start(NOW, Period.DAY) == datetime(2026, 11, 25, tzinfo=UTC)
    assert period_start(NOW, Period.WEEK) == datetime(2026, 11, 23, tzinfo=UTC)  # Monday
    assert period_start(NOW, Period.MONTH) == datetime(2026, 11, 1, tzinfo=UTC)
    assert period_start(datetime(2026, 11, 30, 23, 59, tzinfo=UTC), Period.MONTH).day == 1


def test_a_period_is_counted_in_utc_whatever_zone_the_moment_carries() -> None:
    # 01:30 on the 1st in UTC+02:00 is still the last day of the month before in UTC.
    moment = datetime(2026, 12, 1, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    assert period_start(moment, Period.DAY) == datetime(2026, 11, 30, tzinfo=UTC)
    assert period_start(moment, Period.MONTH) == datetime(2026, 11, 1, tzinfo=UTC)


def test_a_period_ends_where_the_next_one_starts() -> None:
    assert period_end(datetime(2026, 11, 25, tzinfo=UTC), Period.DAY) == datetime(
        2026, 11, 26, tzinfo=UTC
    )
    assert period_end(datetime(2026, 11, 23, tzinfo=UTC), Period.WEEK) == datetime(
        2026, 11, 30, tzinfo=UTC
    )
    assert period_end(datetime(2026, 12, 1, tzinfo=UTC), Period.MONTH) == datetime(
        2027, 1, 1, tzinfo=UTC
    )
    assert period_end(datetime(2028, 2, 1, tzinfo=UTC), Period.MONTH) == datetime(
        2028, 3, 1, tzinfo=UTC
    )  # a leap February: 29 days
    for period in Period:
        start = period_start(NOW, period)
        end = period_end(start, period)
        assert start < NOW < end
        assert period_start(end, period) == end
        assert period_start(end - timedelta(microseconds=1), period) == start

"""Grid carbon intensity over the simulated time: a constant or an hourly curve from a CSV.

The CSV has a header and one row per hour, `hour,gramsPerKWh`, hours 0, 1, 2, ... from the start
of the run; the curve repeats when the run is longer. `with_forecast_error` makes the curve a
planner sees as its forecast when the forecast is not perfect. Not for: live intensity (the
operator reads Prometheus for that).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Used when neither --carbon-intensity, --carbon-csv nor an EnergyBudget's
# spec.carbon.intensityGramsPerKilowattHour gives a figure: a round number near the 2023 world
# average (Ember, Global Electricity Review 2024: ~480 gCO2/kWh), on the low side.
DEFAULT_GRAMS_PER_KWH = 400.0


@dataclass(frozen=True)
class CarbonIntensity:
    hourly_grams_per_kwh: tuple[float, ...]
    source: str

    def grams_per_kwh_at(self, seconds: float) -> float:
        hour = int(seconds // 3600) % len(self.hourly_grams_per_kwh)
        return self.hourly_grams_per_kwh[hour]

    def with_forecast_error(
        self, relative_error: float, *, hours: int, seed: int
    ) -> CarbonIntensity:
        """A forecast of this curve over `hours` hours (then repeating): each hour's value times
        (1 + `relative_error` x a standard normal draw), from `seed`, never below 0. The error of an
        hour is the same whenever it is forecast (the forecast is not refined as the hour nears)."""
        if relative_error < 0:
            raise ValueError(f"--carbon-forecast-error={relative_error}: must be >= 0")
        rng = np.random.default_rng([seed, 14])
        noise = 1.0 + relative_error * rng.standard_normal(hours)
        values = tuple(
            max(0.0, self.grams_per_kwh_at(hour * 3600.0) * float(noise[hour]))
            for hour in range(hours)
        )
        return CarbonIntensity(
            values, f"{self.source}, forecast with {relative_error:.0%} relative error"
        )

    @classmethod
    def constant(cls, grams_per_kwh: float, source: str) -> CarbonIntensity:
        if grams_per_kwh < 0:
            raise ValueError(f"--carbon-intensity={grams_per_kwh}: must be >= 0 gCO2/kWh")
        return cls((grams_per_kwh,), source)


def load_hourly_csv(path: Path) -> CarbonIntensity:
    """Read `hour,gramsPerKWh` rows; hours must be 0, 1, 2, ... in order."""
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise ValueError(f"--carbon-csv {path}: {error}") from error
    values: list[float] = []
    for line, row in enumerate(rows, start=2):
        try:
            hour, grams = int(row["hour"]), float(row["gramsPerKWh"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"--carbon-csv {path} line {line}: need columns hour (integer) and "
                "gramsPerKWh (number)"
            ) from error
        if hour != len(values):
            raise ValueError(
                f"--carbon-csv {path} line {line}: hour={hour}, expected {len(values)}"
            )
        if grams < 0:
            raise ValueError(f"--carbon-csv {path} line {line}: gramsPerKWh={grams} must be >= 0")
        values.append(grams)
    if not values:
        raise ValueError(f"--carbon-csv {path}: no rows")
    return CarbonIntensity(tuple(values), f"hourly curve from {path}")

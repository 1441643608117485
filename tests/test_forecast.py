"""The budget forecast held to the simulator's daily traffic curve: it does not swing with the time of day.

Seven simulated days of a month, spend fed every quarter hour through the real write path in proportion to the
simulator's hourly curve (evening peak, night trough, nightly batch, quieter weekends), the clock moved by hand.
Two monthly budgets share the same traffic: one sized so the whole month comes to 80 % of its limit, the other to
120 %. From the second day on, the first is never forecast over its limit and the second always is; the same
figure is what `/v1/budgets` and the forecast gauge show.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from monitor.budgets.engine import state_json
from monitor.config import load_settings
from monitor.service import open_store
from monitor.simulate import _density as simulated_rate  # relative request rate at a UTC millisecond
from tests.conftest import FakeClock, write_config

# Seven days of events minute by minute: seconds of work: in the slow lane (`scripts/test -m slow`).
pytestmark = pytest.mark.slow

MONTH_START = datetime(2027, 3, 1, tzinfo=UTC)  # a Monday; timezone UTC, so the month is 31 whole UTC days
MONTH_END = datetime(2027, 4, 1, tzinfo=UTC)
QUARTER = timedelta(minutes=15)
TOKENS_PER_USD = 200_000  # claude-haiku-4-5 output: $5 per million tokens
USD_PER_UNIT = Decimal(4)  # a quarter hour at relative rate 1.0 costs $4 in each project
_ids = itertools.count()


def quarter_cost(moment: datetime) -> Decimal:
    """Spend of one project in the quarter hour starting at `moment`, from the simulator's curve (whole tokens)."""
    ms = int(moment.timestamp() * 1000)
    tokens = int(Decimal(simulated_rate(ms)) * USD_PER_UNIT * TOKENS_PER_USD)
    return Decimal(tokens) / TOKENS_PER_USD


def test_forecast_holds_still_over_seven_days_of_the_daily_curve(tmp_path: Path) -> None:
    # What the whole month comes to if the curve holds, summed by hand over its 2,976 quarter hours.
    month_total = Decimal(0)
    moment = MONTH_START
    while moment < MONTH_END:
        month_total += quarter_cost(moment)
        moment += QUARTER
    limits = {"on-course-80": month_total / Decimal("0.8"), "on-course-120": month_total / Decimal("1.2")}
    budgets = "".join(
        f"  - {{name: {name}, match: {{project: {name}}}, window: month, limit_usd: {limit:.6f}}}\n"
        for name, limit in limits.items()
    )
    clock = FakeClock(MONTH_START)
    store = open_store(
        load_settings(write_config(tmp_path, f"timezone: UTC\nbudgets:\n{budgets}"), environ={}),
        clock=clock,
        snapshot_file=tmp_path / "throttle.json",
    )
    ratios: dict[str, list[float]] = {name: [] for name in limits}
    try:
        store.budgets.sync_definitions()
        while clock.now < MONTH_START + timedelta(days=7):
            cost = quarter_cost(clock.now)
            events = [
                {
                    "request_id": f"q-{next(_ids)}",
                    "timestamp": (clock.now + timedelta(minutes=7)).isoformat(),
                    "model": "claude-haiku-4-5",
                    "usage": {"output_tokens": int(cost * TOKENS_PER_USD)},
                    "attributes": {"project": name},
                }
                for name in limits
            ]
            clock.advance(minutes=15)
            result = store.ingestor.submit([("sim", store.parser.parse_object(e)) for e in events], "sim")
            assert result.accepted == len(limits)
            store.budgets.evaluate()
            if clock.now - MONTH_START < timedelta(days=1):
                continue
            for state in store.budgets.states():
                row = state_json(state, {}, clock.now)
                # /v1/budgets says the same as the state behind the gauge, to the micro-dollar.
                assert Decimal(row["forecast_usd"]) == Decimal(state.forecast_cost_pico // 10**6) / 10**6
                ratios[state.budget.name].append(float(Decimal(row["forecast_usd"]) / limits[state.budget.name]))
    finally:
        store.close()

    low, high = ratios["on-course-80"], ratios["on-course-120"]
    assert len(low) == len(high) == 6 * 96 + 1
    print(
        f"\nforecast / limit from day 2 to day 7 ({len(low)} evaluations each):"
        f"\n  on course for 80%:  min {min(low):.3f}  max {max(low):.3f}"
        f"\n  on course for 120%: min {min(high):.3f}  max {max(high):.3f}"
    )
    assert max(low) < 1.0, f"a budget on course for 80% was forecast at {max(low):.1%} of its limit"
    assert min(high) > 1.0, f"a budget on course for 120% was forecast at only {min(high):.1%} of its limit"

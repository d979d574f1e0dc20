"""What a running sweep shows: Tune reports per dictionary, and the live table built from them.

Apart from ``driver.py`` because it is the sweep's display, not its logic: a trial reports each member
of its pack under the member's name, and the driver shows one row per dictionary (never one
member's FVU beside another's L0). The numbers shown are the metrics table's frontier metrics
(``config/metrics.py``: FVU and L0). Imports Ray only inside :func:`live_callback`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from ..config.metrics import Metric, axis, frontier


def live_numbers(values: Mapping[str, float], key: Callable[[Metric], str]) -> tuple[float, ...]:
    """One member's numbers for :func:`report`: ``values[key(metric)]`` for each live metric, NaN when missing."""
    return tuple(values.get(key(m), math.nan) for m in frontier())


def report(step: int, members: dict[str, tuple[float, ...]]) -> dict:
    """One Tune report of a pack: each member's live numbers (:func:`live_numbers`: FVU and L0, in the
    metrics table's order) under its name (``NAME/fvu``, ``NAME/l0``).

    ``best`` is the member with the best frontier ``y`` (the lowest FVU); ``fvu``/``l0`` are its own
    numbers (never one member's FVU beside another's L0).
    """
    live, y = frontier(), axis("y")
    at = live.index(y)
    best = min(members, key=lambda n: (math.isnan(members[n][at]), y.rank(members[n][at])))
    report = {"step": step, "best": best, **{m.name: v for m, v in zip(live, members[best], strict=True)}}
    for name, values in members.items():
        report.update({f"{name}/{m.name}": v for m, v in zip(live, values, strict=True)})
    return report


class LiveTable:
    """The sweep's progress as one row per dictionary (its trial, state, step, FVU, L0), from Tune's reports."""

    def __init__(self, every_seconds: float = 10.0) -> None:
        self.every, self.shown = every_seconds, -math.inf
        self.rows: dict[str, dict] = {}  # member name -> its row
        self.states: dict[str, str] = {}  # trial id -> RUNNING / TERMINATED / ERROR

    def update(self, trial_id: str, result: dict, now: float) -> bool:
        """Take one report of trial ``trial_id``; whether the table is due to be shown again."""
        live = frontier()
        marker = f"/{live[0].name}"  # every member reports each live metric under NAME/<metric>
        for key in result:
            if key.endswith(marker):
                name = key[: -len(marker)]
                self.rows[name] = {"trial": trial_id, "step": result.get("step", 0),
                                   **{m.name: result.get(f"{name}/{m.name}", math.nan) for m in live}}
        if result.get("done") or now - self.shown >= self.every:
            self.shown = now
            return True
        return False

    def text(self) -> str:
        live = frontier()
        lines = [f"{'dictionary':28} {'trial':>14} {'state':>10} {'step':>6}"
                 + "".join(f" {m.header}" for m in live)]
        for name, r in sorted(self.rows.items(), key=lambda kv: (kv[1]["trial"], kv[0])):
            lines.append(f"{name:28} {r['trial']:>14} {self.states.get(r['trial'], 'RUNNING'):>10} {r['step']:>6}"
                         + "".join(f" {m.cell(r.get(m.name))}" for m in live))
        return "\n".join(lines)


def live_callback(table: LiveTable, say: Callable[[str], None]):
    """A Tune callback (driver side) that keeps ``table`` and shows it through ``say`` now and then."""
    import time

    from ray import tune

    class Live(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if table.update(trial.trial_id, result, time.monotonic()):
                say(table.text())

        def on_trial_complete(self, iteration, trials, trial, **info):
            table.states[trial.trial_id] = "TERMINATED"

        def on_trial_error(self, iteration, trials, trial, **info):
            table.states[trial.trial_id] = "ERROR"
            say(table.text())

    return Live()

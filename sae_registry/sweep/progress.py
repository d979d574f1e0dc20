"""What a running sweep shows: Tune reports per dictionary, and the live table built from them.

Apart from ``sweep.py`` because it is the sweep's display, not its logic: a trial reports each member
of its pack under the member's name, and the driver shows one row per dictionary (never one
member's FVU beside another's L0). Imports Ray only inside :func:`live_callback`.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def report(step: int, members: dict[str, tuple[float, float]]) -> dict:
    """One Tune report of a pack: each member's FVU and L0 under its name (``NAME/fvu``, ``NAME/l0``).

    ``fvu``/``l0``/``best`` are the best member's own pair (never one member's FVU beside another's L0).
    """
    best = min(members, key=lambda n: (math.isnan(members[n][0]), members[n][0]))
    report = {"step": step, "best": best, "fvu": members[best][0], "l0": members[best][1]}
    for name, (fvu, l0) in members.items():
        report.update({f"{name}/fvu": fvu, f"{name}/l0": l0})
    return report


class LiveTable:
    """The sweep's progress as one row per dictionary (its trial, state, step, FVU, L0), from Tune's reports."""

    def __init__(self, every_seconds: float = 10.0) -> None:
        self.every, self.shown = every_seconds, -math.inf
        self.rows: dict[str, dict] = {}  # member name -> its row
        self.states: dict[str, str] = {}  # trial id -> RUNNING / TERMINATED / ERROR

    def update(self, trial_id: str, result: dict, now: float) -> bool:
        """Take one report of trial ``trial_id``; whether the table is due to be shown again."""
        for key, fvu in result.items():
            if key.endswith("/fvu"):
                name = key[: -len("/fvu")]
                self.rows[name] = {"trial": trial_id, "step": result.get("step", 0), "fvu": fvu,
                                   "l0": result.get(f"{name}/l0", math.nan)}
        if result.get("done") or now - self.shown >= self.every:
            self.shown = now
            return True
        return False

    def text(self) -> str:
        lines = [f"{'dictionary':28} {'trial':>14} {'state':>10} {'step':>6} {'FVU':>8} {'L0':>8}"]
        for name, r in sorted(self.rows.items(), key=lambda kv: (kv[1]["trial"], kv[0])):
            lines.append(f"{name:28} {r['trial']:>14} {self.states.get(r['trial'], 'RUNNING'):>10} {r['step']:>6} "
                         f"{r['fvu']:>8.4f} {r['l0']:>8.1f}")
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

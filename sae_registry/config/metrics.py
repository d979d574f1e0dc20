"""The metrics table: one torch-free row per number about a dictionary, from which everything else derives.

The registry's version tags and descriptions, the columns of ``sae-registry list`` and of a sweep's
summary, the sweep's Pareto frontier and live table, and the ``champion_by`` choices all read
:data:`METRICS`; nothing names a metric again by hand. The numbers themselves are computed in
``metrics/`` (``reconstruction.py``, ``downstream.py``); a row only says how each is keyed, ranked,
printed and described.

It lives in ``config/`` (layer 2), not ``metrics/`` (layer 5), because the sweep spec
(``config/sweep.py``) checks ``champion_by`` against it and a module imports only lower layers; and
because ``sae-registry --help`` and a spec's checks must stay torch-free, which ``metrics/`` is not.

Add a metric: compute it in ``metrics/`` (a function, and its key in the dict that
``reconstruction.evaluate`` or ``Downstream.run`` returns) and add its row here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

from ..errors import require_choice

# What computes a metric: reconstruction.evaluate on the store's held-out split (at every evaluation of a
# training run and at its end), or Downstream.run with the dictionary spliced into the source model (when
# asked: a sweep's ``evaluate: downstream``, ``sae-registry evaluate``).
RECONSTRUCTION: Final = "reconstruction"
DOWNSTREAM: Final = "downstream"


@dataclass(frozen=True)
class Metric:
    """One number about a dictionary: how it is keyed, which way is better, how it is printed."""

    name: str  # the key in what computes it: reconstruction's dict (``fvu``); downstream's without ``downstream/``
    better: Literal["lower", "higher"]
    fmt: str  # format spec for printing it (``.4f``)
    where: Literal["reconstruction", "downstream"]  # what computes it: RECONSTRUCTION or DOWNSTREAM
    label: str  # its name in prose: descriptions, the train command's line (``dead fraction``)
    description: str  # one line
    heading: str = ""  # its column heading (``dead``); default: the label
    width: int = 8  # its column width
    listed: bool = False  # a column of `sae-registry list` and of a sweep's summary (`show` prints every tag)
    champion: str = ""  # the ``champion_by`` value that gives the alias to the best by it ("": none)
    # The sweep's trade-off: "x" for what a dictionary spends, "y" for what it gets wrong. The Pareto
    # frontier (per dict_size) is over both, the live table shows both, the summary is sorted by x then y.
    axis: Literal["", "x", "y"] = ""

    @property
    def key(self) -> str:
        """Its key in the dict that computes it, and on the run for a downstream one (``downstream/fidelity``)."""
        return self.name if self.where == RECONSTRUCTION else f"{self.where}/{self.name}"

    @property
    def eval_key(self) -> str:
        """Its key in a training history entry (``eval/fvu``; reconstruction metrics only)."""
        return f"eval/{self.name}"

    @property
    def run_key(self) -> str:
        """The metric logged on the MLflow run at the end (``final/fvu``, ``downstream/fidelity``)."""
        return f"final/{self.name}" if self.where == RECONSTRUCTION else self.key

    @property
    def tag(self) -> str:
        """The tag on the registered version (``fvu``, ``downstream.fidelity``)."""
        return self.key.replace("/", ".")

    @property
    def optional(self) -> bool:
        """Measured only when asked: its column appears once some dictionary has it."""
        return self.where != RECONSTRUCTION

    def rank(self, value: float) -> float:
        """A sort key: smaller is better."""
        return value if self.better == "lower" else -value

    @property
    def title(self) -> str:
        """Its column heading."""
        return self.heading or self.label

    @property
    def header(self) -> str:
        """Its column heading, right-aligned in its column."""
        return f"{self.title:>{self.width}}"

    def cell(self, value: object) -> str:
        """``value`` (a number, or a tag's text) formatted and right-aligned in its column; ``-`` when missing."""
        try:
            text = format(float(value), self.fmt)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            text = "-"
        return f"{text:>{self.width}}"


METRICS: tuple[Metric, ...] = (
    # Reconstruction (metrics/reconstruction.py): the order here is the order of columns and descriptions.
    Metric("fvu", "lower", ".4f", RECONSTRUCTION, "FVU",
           "fraction of variance unexplained: sum (x - x_hat)^2 / sum (x - mean x)^2; 0 is perfect",
           listed=True, champion="fvu", axis="y"),
    Metric("explained_variance", "higher", ".4f", RECONSTRUCTION, "explained variance", "1 - FVU"),
    Metric("l0", "lower", ".1f", RECONSTRUCTION, "L0", "mean number of non-zero latents per token",
           listed=True, axis="x"),
    Metric("dead_fraction", "lower", ".3f", RECONSTRUCTION, "dead fraction",
           "fraction of latents that never fire on the held-out tokens", heading="dead", width=6, listed=True),
    Metric("mse", "lower", ".5f", RECONSTRUCTION, "MSE", "mean squared error over every element"),
    # Downstream (metrics/downstream.py); the floors it also reports (ce_zero, kl_zero, cosine_zero, ...)
    # describe the model and text, not the dictionary, and have no row.
    Metric("fidelity", "higher", ".4f", DOWNSTREAM, "downstream fidelity",
           "what the model keeps on the reconstruction: 1 perfect, 0 no better than zeros (loss recovered "
           "for a causal LM)", heading="fidelity", listed=True, champion="downstream"),
    Metric("loss_recovered", "higher", ".4f", DOWNSTREAM, "loss recovered",
           "causal LM: (CE zero - CE spliced) / (CE zero - CE clean)"),
    Metric("loss_recovered_mean", "higher", ".4f", DOWNSTREAM, "loss recovered (mean floor)",
           "causal LM: loss recovered against mean-ablation instead of zeros"),
    Metric("ce_increase", "lower", ".4f", DOWNSTREAM, "CE increase",
           "causal LM: next-token cross-entropy spliced minus clean, nats per token"),
    Metric("kl_spliced", "lower", ".4f", DOWNSTREAM, "KL to clean",
           "causal LM: mean per-token KL(clean || spliced) of the next-token distribution"),
    Metric("cosine_spliced", "higher", ".4f", DOWNSTREAM, "embedding cosine",
           "encoder: mean cosine of the spliced sentence embedding to the clean one"),
)


def metrics(where: str | None = None) -> tuple[Metric, ...]:
    """Every row (or those ``where`` computes), in the table's order."""
    return tuple(m for m in METRICS if where is None or m.where == where)


def listed() -> tuple[Metric, ...]:
    """The columns of ``sae-registry list`` and of a sweep's summary, in order."""
    return tuple(m for m in METRICS if m.listed)


def frontier() -> tuple[Metric, ...]:
    """The sweep's trade-off: its live table's columns, in the table's order."""
    return tuple(m for m in METRICS if m.axis)


def axis(which: str) -> Metric:
    """The frontier's ``x`` (what a dictionary spends) or ``y`` (what it gets wrong)."""
    return next(m for m in METRICS if m.axis == which)


def champion_choices() -> tuple[str, ...]:
    """The values of a sweep's ``champion_by``; the first is its default."""
    return tuple(m.champion for m in METRICS if m.champion)


def default_champion() -> str:
    """``champion_by`` when a spec says nothing."""
    return champion_choices()[0]


def champion_metric(choice: str) -> Metric:
    """The metric ``champion_by: choice`` ranks by (an error listing the choices for any other value)."""
    require_choice("champion_by", choice, champion_choices())
    return next(m for m in METRICS if m.champion == choice)


def by_tag(tag: str) -> Metric | None:
    """The metric a version's tag holds, if any."""
    return next((m for m in METRICS if m.tag == tag), None)


def usable(value: float | None) -> bool:
    """A measured number that can rank: not missing, not NaN."""
    return value is not None and not math.isnan(value)

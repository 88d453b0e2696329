"""Margins for the floating-point backends (CBC, HiGHS), in one place.

They work to a feasibility tolerance of ~1e-7, so a row can be met "within tolerance"
and still fail the verifier's exact replay. The rows are therefore tightened:
- latency rows by TIME_MARGIN_MS, so a rounded plan meets the target exactly when
  re-simulated in floating point (a plan's gap is proven for the tightened program);
- importance rows are multiplied by IMPORTANCE_SCALE / (largest shard importance), so the
  absolute tolerance is ~1e-13 of an importance, and the floor keeps IMPORTANCE_MARGIN
  scaled units (1e-12 of the largest importance) to spare.
Both float backends take their rows' margins from `float_margins`; EXACT is none at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from elasticplan.problem.spec import ModelProfile, Scenario

TIME_MARGIN_MS = 1e-5
IMPORTANCE_SCALE = 1e6
IMPORTANCE_MARGIN = 1e-6
TINY_IMPORTANCE = 1e-200  # the least largest importance the scalings divide by


@dataclass(frozen=True)
class Margins:
    time_ms: float  # subtracted from every latency row's right-hand side
    importance_scale: float  # importance coefficients (rows and objective) are multiplied by it
    importance_floor: float  # added to the scaled importance floor

    def latency_rhs(self, target_ms: float) -> float:
        return target_ms - self.time_ms

    def floor_rhs(self, floor: float) -> float:
        """The scaled right-hand side of an importance floor row. A floor of 0 keeps no
        margin: every plan meets it, and with the margin a model whose importances are
        all 0 had no plan at all (CBC proved min_latency at floor 0 infeasible)."""
        return self.importance_scale * floor + (self.importance_floor if floor > 0 else 0.0)


EXACT = Margins(time_ms=0.0, importance_scale=1.0, importance_floor=0.0)


def importance_top(model: ModelProfile) -> float:
    """What the float and integer programs scale importance by (their unit): the largest
    shard importance, 1 when every importance is 0, and at least TINY_IMPORTANCE, since
    dividing by a subnormal largest importance overflows the scale to infinity (a
    hypothesis example: 2.2e-308, whose 0 importances then scaled to NaN); importances
    that small are far below every backend's tolerance."""
    top = model.max_importance
    return max(top, TINY_IMPORTANCE) if top > 0 else 1.0


def float_margins(scenario: Scenario) -> Margins:
    top = importance_top(scenario.model)
    return Margins(time_ms=TIME_MARGIN_MS, importance_scale=IMPORTANCE_SCALE / top,
                   importance_floor=IMPORTANCE_MARGIN)

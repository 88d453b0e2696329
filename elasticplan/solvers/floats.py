"""Margins for the floating-point backends (CBC, HiGHS), in one place.

They work to a feasibility tolerance of ~1e-7, so a row can be met "within tolerance"
and still fail the verifier's exact replay. The rows are therefore tightened:
- latency rows by TIME_MARGIN_MS, so a rounded plan meets the target exactly when
  re-simulated in floating point (a plan's gap is proven for the tightened program);
- importance rows are multiplied by IMPORTANCE_SCALE / (largest shard importance), so the
  absolute tolerance is ~1e-13 of an importance, and the floor keeps IMPORTANCE_MARGIN
  scaled units (1e-12 of the largest importance) to spare.
"""

TIME_MARGIN_MS = 1e-5
IMPORTANCE_SCALE = 1e6
IMPORTANCE_MARGIN = 1e-6

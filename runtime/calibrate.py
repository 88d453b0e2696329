"""`elasticplan calibrate`: measure this machine's compute costs inside the pipelined
runtime and write a device spec ("this machine + storage at X MB/s") and a scenario on it.

Compute. The device's compute model (elasticplan.costmodel) is, per layer that runs,
    layer_ms = layer_overhead_ms + sum over its shards of (shard_overhead_ms
               + flops / gflops + weights x dequant_ns_per_weight[bits], quantised only
               + stored MB x stream_ms_per_mb, streamed only)
               + MB read beside it x contention_ms_per_mb
               + reads made beside it x contention_ms_per_read
(the last two features are measured from each run's traces: every layer's read bytes and
requests spread evenly over the span in which the IO thread really read them, counted
where that span overlaps this layer's compute; runtime.executor.concurrent) and per query
embed_ms
(before layer 0) and pool_ms (after the last layer).
Calibration runs designed plans through the real executor, with the storage emulated as
it will be in real runs, so the measured layer times carry the pipeline's own effects
(idle OpenMP threads, the IO thread; docs/runtime.md, "Measured facts"). The plans
separate the terms (`design`): one per stored bitwidth (every layer a random subset of
its shards at that bitwidth: the per-weight cost of each bitwidth), hold-in-memory (every
shard fp32, preloaded: compute-bound), every shard preloaded at each bitwidth a decoder's
kernel computes (decode_calibrate.kernel_bits), every shard at the lowest bitwidth
preloaded, fp32 subsets preloaded, then random mixed plans; subsets of every size and mix of heads and
FFN slices separate the per-layer, per-shard and per-flop terms, and a quarter of the
subsets' shards preloaded (three quarters streamed) the two contention terms: a streamed
shard computes slower than the same shard preloaded, and a layer computes slower while
the IO thread reads beside it (docs/design.md, "Contention"). The planner charges the
second per streamed MB to the shard's own layer where reads overlap compute, so that a
pass pays it once per byte it streams.

Rounds. Every plan's executor is opened once (as many at once as a quarter of the RAM
holds) and the plans run interleaved, one query each per round, so that a change in the
machine's speed (other work, the host; this VM's speed moves by 10-20 % within seconds)
falls on every plan alike rather than on whichever ran then. Rounds go on past
`repeats` until every term is tight (its standard error, times the most of its feature a
layer has, within TERM_SE_PCT % of the mean layer time) or `budget_s` is spent. Each
(plan, layer) sample is the median over the rounds, so one slow run does not move a
term. The layer terms come from a non-negative least-squares fit (scipy.optimize.nnls)
with each term's standard error; embedding and pooling are the medians of their measured
times. The file's header records the fit (R^2, mean error, each term's uncertainty), the
residual per layer, the rounds and why they stopped, the machine's run-to-run noise, and
the stage errors of the calibration runs, each predicted out of sample (below).

Spread. Every calibration run is then predicted out of sample, by the fit of the other
plans (leave one plan out); per stage (IO:
the sum of the layers' read intervals; compute: the sum of their compute intervals), the
root mean square of log(measured / predicted) over every run is the stage's spread
(model error and run-to-run noise together). Scenarios that plan for a latency quantile
use it (elasticplan.costmodel.at_quantile).

Refusal. A device that does not predict its own calibration runs is not written: when a
stage's out-of-sample |error| (each plan's median run against its prediction by the fit
of the other plans, in % of the plan's latency; median over plans) is above `max_error_pct` (or its p95 above
P95_FACTOR times it), calibrate raises CalibrationError (exit 9) naming the stage, both
figures and the machine's run-to-run noise, and what to try; and likewise when that
noise (a robust sigma) is so wide that even an exact model's median of 5 runs would have a standard
error above max_error_pct (NOISE_FACTOR).

Storage. With `bandwidth_mb_s` given, the device's storage is that (emulated in runs).
Without it, this machine's disk is measured: cold single reads of every variant of two
layers, fit to latency + bytes / bandwidth, for runs without emulation. With `throttle`
(the runs read through the kernel's block-IO throttle at that bandwidth, no device clock)
the device's storage is still the throttle's settings, and beside it the storage the
throttled reads delivered is fitted from the calibration runs' read intervals
(DeliveredStorage: its terms, noise and out-of-sample stage errors, in the header).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.optimize
import torch

from elasticplan.costmodel import Layout, Pick, Selection, Steps, every_shard, simulate
from elasticplan.errors import CalibrationError, InvalidArgument
from elasticplan.plans.plan import Plan, SolveStatus
from elasticplan.problem.limits import (
    MAX_BANDWIDTH_MB_S,
    MAX_CONTENTION_SHARE,
    MAX_GFLOPS,
    MAX_SPREAD,
    MAX_TARGET_MS,
)
from elasticplan.problem.loader import load_scenario, parse_device, write_checked_yaml
from elasticplan.problem.outputs import refuse_inputs
from elasticplan.problem.question import Question
from elasticplan.problem.spec import (
    FULL_PRECISION_BITS,
    Device,
    Disk,
    ModelProfile,
    Scenario,
    Spread,
)
from runtime import cgroups
from runtime.cgroups import THROTTLE_GAP_S, IoThrottle
from runtime.executor import Executor, concurrent
from runtime.iodev import evict
from runtime.measurement.measure import Spacing
from runtime.store import ShardStore

DEFAULT_LATENCY_US = 100.0
DEFAULT_PLANS = 16
DEFAULT_REPEATS = 3  # rounds at least
DEFAULT_BUDGET_S = 60.0  # more rounds until every term is tight, or this is spent
MAX_ROUNDS = 100
TERM_SE_PCT = 1.0  # a term is tight when its uncertainty moves a layer's time by at most this
DEFAULT_MAX_ERROR_PCT = 5.0  # refuse when a stage's out-of-sample median |error| is above it
P95_FACTOR = 3.0  # ... or its p95 above this times it
# ... or when the machine's run-to-run noise (a robust sigma) is so wide that a median of 5 runs has a
# standard error (1.2533 sigma / sqrt 5) above max_error_pct even for an exact model
NOISE_FACTOR = math.sqrt(5) / 1.2533
INTERLEAVE_MEMORY_SHARE = 0.25  # executors open at once hold at most this share of the RAM


@dataclass
class FitErrors:
    """The standard error of each fitted term, in the term's own unit."""

    layer_overhead_ms: float = 0.0
    shard_overhead_ms: float = 0.0
    gflops: float = 0.0
    dequant_ns: dict[int, float] = field(default_factory=dict)  # per quantised bitwidth
    vector_ns: dict[int, float] = field(default_factory=dict)  # per bitwidth, one vector
    stream_ms_per_mb: float = 0.0
    contention_ms_per_mb: float = 0.0
    contention_ms_per_read: float = 0.0
    contention_share: float = 0.0
    embed_ms: float = 0.0
    pool_ms: float = 0.0
    wake_ms: float = 0.0


@dataclass
class Fit:
    """The fitted compute terms, each with its standard error (`stderr`, same unit), and how
    well the model fits the calibration samples."""

    layer_overhead_ms: float
    shard_overhead_ms: float
    gflops: float
    dequant_ns: dict[int, float]  # per quantised bitwidth
    # per bitwidth, of shards multiplied by one vector (a decoder's; Device.weight_ns)
    vector_ns: dict[int, float] = field(default_factory=dict)
    stream_ms_per_mb: float = 0.0  # compute per MB of the layer's streamed shards
    contention_ms_per_mb: float = 0.0  # compute per MB the IO thread reads beside it
    contention_ms_per_read: float = 0.0  # ... and per read request it makes beside it
    # the same contention placed in time (Device.contention_share): of each ms the IO thread
    # read beside a layer, fitted to what the terms above but those two leave unexplained
    contention_share: float = 0.0
    embed_ms: float = 0.0
    pool_ms: float = 0.0
    wake_ms: float = 0.0
    stderr: FitErrors = field(default_factory=FitErrors)
    r2: float = 0.0
    mae_ms: float = 0.0
    samples: int = 0
    layer_residuals_ms: list[float] = field(default_factory=list)  # mean measured - predicted
    layer_residuals_pct: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the fit could not separate


@dataclass(frozen=True)
class Sample:
    """One executed layer of one calibration plan: its features and the median measured
    compute time over the repeats."""

    layer: int
    shards: int
    flops: float
    weights: dict[int, int]  # quantised bitwidth -> weights of the layer's shards at it
    ms: float
    plan: int = 0  # which calibration plan it came from
    streamed_mb: float = 0.0  # stored MB of the layer's streamed (not preloaded) shards
    beside_mb: float = 0.0  # MB the IO thread read while the layer computed (median)
    # bitwidth -> weights of the layer's shards at it multiplied by one vector (Shard.vector:
    # a decoder's); `weights` then holds those multiplied by a matrix
    vector_weights: dict[int, int] = field(default_factory=dict)
    beside_reads: float = 0.0  # read requests the IO thread made meanwhile (median)
    beside_ms: float = 0.0  # ms the IO thread read meanwhile (median)


def beside_features(per_run: list[tuple[float, float, float]]) -> dict[str, float]:
    """A sample's contention features from each run's (MB, reads, ms) beside its compute
    (runtime.executor.concurrent): the medians over the runs."""
    return {"beside_mb": float(np.median([mb for mb, _, _ in per_run])),
            "beside_reads": float(np.median([n for _, n, _ in per_run])),
            "beside_ms": float(np.median([ms for _, _, ms in per_run]))}


def fit_compute(samples: list[Sample], bits: tuple[int, ...],
                weights: np.ndarray | None = None, vector_bits: tuple[int, ...] = ()) -> Fit:
    """Non-negative least squares of the layer model over the samples; `bits` are the
    bitwidths to fit a per-weight cost for (each needs samples that use it: the quantised
    ones; a decoder's fit adds 32), `vector_bits` those to fit one for shards multiplied
    by one vector (a decoder's: Sample.vector_weights). `weights`: each sample's weight in
    the squares (None: all 1; a decoder's fit weighs a sample by 1 / its pass's latency,
    so that a decode step's layers count as much, relative to their pass, as the prompt
    pass's)."""
    if not samples:
        raise CalibrationError("no layer was measured")
    A = np.array([[1.0, s.shards, s.flops] + [s.weights.get(b, 0) for b in bits]
                  + [s.vector_weights.get(b, 0) for b in vector_bits]
                  + [s.streamed_mb, s.beside_mb, s.beside_reads] for s in samples])
    y = np.array([s.ms for s in samples])
    for kind, these, first in (("", bits, 3), (" multiplied by one vector", vector_bits,
                                                3 + len(bits))):
        unused = [b for i, b in enumerate(these) if not A[:, first + i].any()]
        if unused:
            raise CalibrationError(f"no calibration plan ran a shard at {unused} bits{kind}; "
                                   f"rerun with more plans (--plans)")
    vec = len(bits) + 3  # the vector terms' first column
    stream = vec + len(vector_bits)  # the streamed weights' column, then the contention terms'
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
    scale = np.abs(A * w[:, None]).max(axis=0)  # columns of ~1: nnls and the covariance
    scale[scale == 0] = 1.0                      # well conditioned
    x, _ = scipy.optimize.nnls(A * w[:, None] / scale, y * w)
    x = x / scale
    pred = A @ x
    resid = y - pred
    ss_tot = float(np.sum((y - y.mean()) ** 2)) or 1.0
    # Standard errors of the terms the fit kept (> 0): s^2 (A'WA)^-1 over those columns,
    # s^2 from the weighted residuals.
    active = np.flatnonzero(x > 0)
    dof = max(1, len(y) - len(active))
    s2 = float((resid * w) @ (resid * w)) / dof
    scaled = A[:, active] * w[:, None] / scale[active]
    cov = np.linalg.pinv(scaled.T @ scaled) * s2
    se = np.zeros(len(x))
    se[active] = np.sqrt(np.clip(np.diag(cov), 0, None)) / scale[active]
    # In the device's units: gflops = 1 / (ms per flop * 1e6) (delta method), ns = ms * 1e6.
    # A model whose shards come in two shapes (heads, FFN slices) separates the per-flop
    # from the per-shard and per-weight terms only through their differences: a fit that
    # finds no time per flop beyond them charges none (gflops at its maximum) and says so.
    notes = []
    if x[2] > 0:
        gflops = 1.0 / (x[2] * 1e6)
        gflops_se = float(se[2]) / x[2] * gflops
    else:
        gflops, gflops_se = MAX_GFLOPS, 0.0
        notes.append("no time per flop beyond the per-shard and per-weight terms: gflops set "
                     "to its maximum (no per-flop charge)")
    stderr = FitErrors(layer_overhead_ms=float(se[0]), shard_overhead_ms=float(se[1]),
                       gflops=gflops_se,
                       dequant_ns={b: float(se[3 + i] * 1e6) for i, b in enumerate(bits)},
                       vector_ns={b: float(se[vec + i] * 1e6)
                                  for i, b in enumerate(vector_bits)},
                       stream_ms_per_mb=float(se[stream]),
                       contention_ms_per_mb=float(se[stream + 1]),
                       contention_ms_per_read=float(se[stream + 2]))
    share, share_se = _share_fit(A, x, y, w, stream + 1,
                                 np.array([s.beside_ms for s in samples]))
    stderr.contention_share = share_se
    layers = sorted({s.layer for s in samples})
    by_layer = {l: [i for i, s in enumerate(samples) if s.layer == l] for l in layers}
    return Fit(layer_overhead_ms=float(x[0]), shard_overhead_ms=float(x[1]), gflops=gflops,
               dequant_ns={b: float(x[3 + i] * 1e6) for i, b in enumerate(bits)},
               vector_ns={b: float(x[vec + i] * 1e6) for i, b in enumerate(vector_bits)},
               stream_ms_per_mb=float(x[stream]),
               contention_ms_per_mb=float(x[stream + 1]),
               contention_ms_per_read=float(x[stream + 2]), contention_share=share,
               stderr=stderr,
               r2=1.0 - float(resid @ resid) / ss_tot, mae_ms=float(np.mean(np.abs(resid))),
               samples=len(y), notes=notes,
               layer_residuals_ms=[float(np.mean(resid[by_layer[l]])) for l in layers],
               layer_residuals_pct=[float(100 * np.mean(resid[by_layer[l]])
                                          / np.mean(y[by_layer[l]])) for l in layers])


def _share_fit(A: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray, first: int,
               overlap_ms: np.ndarray) -> tuple[float, float]:
    """The contention share and its standard error: least squares through 0 of what the
    fitted terms but the two contention ones (columns first, first + 1) leave of each
    sample's time, on the ms the IO thread read beside it; within [0,
    MAX_CONTENTION_SHARE]."""
    rest = A @ x - A[:, first:first + 2] @ x[first:first + 2]
    r, f = (y - rest) * w, overlap_ms * w
    ff = float(f @ f)
    if ff <= 0:
        return 0.0, 0.0
    share = min(MAX_CONTENTION_SHARE, max(0.0, float(f @ r) / ff))
    s2 = float((r - share * f) @ (r - share * f)) / max(1, len(y) - 1)
    return share, math.sqrt(s2 / ff)


def _subset(model: ModelProfile, li: int, bit: int, rng: np.random.Generator,
            preload_share: float) -> tuple[Pick, ...]:
    n = len(model.layers[li].shards)
    k = int(rng.integers(1, n + 1))
    return tuple(Pick(int(s), bit, bool(rng.random() < preload_share))
                 for s in rng.choice(n, size=k, replace=False))


def design(model: ModelProfile, plans: int, rng: np.random.Generator,
           held_bits: tuple[int, ...] = (), streamed_top: bool = False
           ) -> list[tuple[str, Selection]]:
    """The calibration plans (module docstring), `plans` of them, named. `held_bits`: more
    bitwidths to hold every shard at, preloaded, each a plan of its own in place of a
    random one (a decoder's kernel bits: runtime.decode_calibrate.kernel_bits, whose term
    the streamed plans alone left confounded with contention). `streamed_top`: every shard
    at the top bitwidth, streamed, in place of a random one (`calibrate --throttle`: the
    disk beneath the throttle is fitted on layers read whole, as the plans at 1 GB/s and
    layer-wise pipelining read them; without it the fit ran 7-25 % slow for those)."""
    B, L = len(model.bitwidths), len(model.layers)
    if plans < B + 1:
        raise CalibrationError(f"--plans {plans} is too few: the design needs one plan per "
                               f"stored bitwidth ({B}) and a compute-bound one, at least {B + 1}")
    out: list[tuple[str, Selection]] = []
    for b in range(B):
        out.append((f"{model.bitwidths[b]}-bit subsets",
                    tuple(_subset(model, li, b, rng, 0.25) for li in range(L))))
    out.append(("hold-in-memory", every_shard(model, B - 1, True)))
    for bits in held_bits:
        b = model.bit_index(bits)
        # the lowest bitwidth and the top have whole-model plans of their own
        if plans > len(out) and b is not None and 0 < b < B - 1:
            out.append((f"every shard at {bits} bits, preloaded", every_shard(model, b, True)))
    if plans > len(out):
        out.append((f"every shard at {model.bitwidths[0]} bits, preloaded",
                    every_shard(model, 0, True)))
    if plans > len(out):  # the fp32 costs again, on other subsets: per flop vs per shard
        out.append((f"{model.bitwidths[-1]}-bit subsets, preloaded",
                    tuple(_subset(model, li, B - 1, rng, 1.0) for li in range(L))))
    if streamed_top and plans > len(out):
        out.append((f"every shard at {model.bitwidths[-1]} bits, streamed",
                    every_shard(model, B - 1, False)))
    while len(out) < plans:
        out.append(("random", tuple(_subset(model, li, int(rng.integers(B)), rng, 0.25)
                                    for li in range(L))))
    return out


@dataclass(frozen=True)
class DeliveredStorage:
    """`calibrate --throttle`: the disk beneath the kernel's throttle as the throttled reads
    delivered it, fitted like the cost model's storage terms (each layer's read interval,
    the median over the rounds, = reads x latency + MB / bandwidth; non-negative least
    squares over every (plan, layer) that reads within the throttle's first slice), with
    each term's standard error, R^2, the run-to-run noise of a layer's read interval
    (robust sigma of log run / its median), and each stage's out-of-sample error predicted
    as `run --throttle` predicts (these terms held to the throttle's steps; each plan
    predicted by the storage and compute fits of the other plans; median, p95 in % of the
    latency, as `Calibration.stage_errors`). The device file keeps the throttle's settings
    as its storage (what the planner prices and `run --throttle` sets the kernel to) and
    these terms as its `storage.disk` (docs/runtime.md, "What the kernel's throttle is")."""

    latency_us: float
    bandwidth_mb_s: float
    latency_se_us: float
    bandwidth_se_mb_s: float
    r2: float
    samples: int
    noise_pct: float
    stage_errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def disk(self) -> Disk:
        """The device's `storage.disk`: these terms, as its file keeps them."""
        return Disk(bandwidth_mb_s=round(float(self.bandwidth_mb_s), 3),
                    latency_us=round(float(self.latency_us), 3))

    def describe(self) -> str:
        errors = "; ".join(f"{k} {m:.1f} % / {p:.1f} %" for k, (m, p) in self.stage_errors.items())
        return (f"the throttled reads delivered {self.latency_us:.1f} +- {self.latency_se_us:.1f} "
                f"us per read + {self.bandwidth_mb_s:.1f} +- {self.bandwidth_se_mb_s:.1f} MB/s "
                f"(fit of {self.samples} layers' read intervals, R^2 {self.r2:.3f}; a layer's "
                f"read interval ran {self.noise_pct:.1f} % apart run to run, robust sigma); "
                f"predicted with these terms held to the throttle's steps, the calibration "
                f"plans' stage |error| out of sample, median / p95: {errors}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self),
                "stage_errors": {k: list(v) for k, v in self.stage_errors.items()}}


def delivered_storage(designed: list, runs_of: list[list], plan: int | None = None,
                      steps: Steps | None = None
                      ) -> tuple[float, float, float, float, float, int, float]:
    """The storage terms the measured reads deliver (DeliveredStorage), fitted over every
    calibration plan but `plan`: (latency us, bandwidth MB/s, their standard errors, R^2,
    samples, noise %). With the throttle's `steps`, a layer whose reads go past the first
    slice's allowance (a query's first bytes up to its last) is left out: the steps, not
    the disk, time it."""
    rows, y, logs = [], [], []
    for i, runs in enumerate(runs_of):
        if i == plan or not runs:
            continue
        read = 0
        for l, t in enumerate(runs[0].layers):
            read += t.read_bytes
            if not t.reads or (steps is not None and steps.waits(read) > 0):
                continue
            ms = [r.layers[l].io_end_ms - r.layers[l].io_start_ms for r in runs]
            med = float(np.median(ms))
            rows.append([t.reads, t.read_bytes / 1e6])
            y.append(med)
            logs += [abs(math.log(m / med)) for m in ms if m > 0 and med > 0]
    if len(rows) < 3:
        raise CalibrationError("the calibration plans read too few layers to fit the storage "
                               "the throttled reads delivered; rerun with more plans (--plans)")
    A, yv = np.array(rows), np.array(y)
    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1.0
    x, _ = scipy.optimize.nnls(A / scale, yv)
    x = x / scale
    resid = yv - A @ x
    active = np.flatnonzero(x > 0)
    s2 = float(resid @ resid) / max(1, len(yv) - len(active))
    se = np.zeros(2)
    scaled = A[:, active] / scale[active]
    se[active] = np.sqrt(np.clip(np.diag(np.linalg.pinv(scaled.T @ scaled) * s2), 0, None)) \
        / scale[active]
    ss_tot = float(np.sum((yv - yv.mean()) ** 2)) or 1.0
    bandwidth = min(MAX_BANDWIDTH_MB_S, 1e3 / x[1]) if x[1] > 0 else MAX_BANDWIDTH_MB_S
    bandwidth_se = bandwidth * float(se[1]) / x[1] if x[1] > 0 else 0.0
    noise = round(100 * 1.4826 * float(np.median(logs)), 2) if logs else 0.0
    return (float(x[0]) * 1e3, bandwidth, float(se[0]) * 1e3, bandwidth_se,
            1.0 - float(resid @ resid) / ss_tot, len(yv), noise)


@dataclass
class Calibration:
    device: Device
    fit: Fit
    facts: dict
    stage_errors: dict[str, tuple[float, float]]  # stage -> (median, p95) |error| in %
    delivered: DeliveredStorage | None = None  # --throttle: the storage the reads delivered


def calibrate(store: ShardStore, base: Scenario, *, bandwidth_mb_s: float | None,
              latency_us: float, plans: int = DEFAULT_PLANS, repeats: int = DEFAULT_REPEATS,
              budget_s: float = DEFAULT_BUDGET_S, max_error_pct: float = DEFAULT_MAX_ERROR_PCT,
              seed: int = 0, queries: list | None = None,
              log: Callable[[str], None] = lambda s: None, throttle: bool = False
              ) -> Calibration:
    """Measure; return the calibrated device, the compute fit and facts for the file header.
    Refuses (CalibrationError) when the calibration runs, each predicted out of sample, are
    further from their predictions than max_error_pct (module docstring, "Refusal").
    `throttle`: no device clock; the runs read through a block-IO cgroup that the kernel
    throttles to the bandwidth and latency (runtime/cgroups.py, `calibrate --throttle`),
    each run a fresh slice of it (THROTTLE_GAP_S after the run before); the device gets
    the disk beneath the throttle (Device.disk)."""
    if throttle and bandwidth_mb_s is None:
        raise InvalidArgument("--throttle needs --storage-mb-s: the bandwidth the kernel is "
                              "to hold the reads to")
    bandwidth_mb_s, latency_us, storage, emulate = storage_of(store, bandwidth_mb_s, latency_us)
    memory_mb = machine_memory_mb()
    model = base.model
    if any(s.weights is None for layer in model.layers for s in layer.shards):
        raise CalibrationError(f"{base.source}: model {model.name!r} does not give its shards' "
                               f"weights; regenerate the profile")
    quantised = tuple(b for b in model.bitwidths if b < FULL_PRECISION_BITS)
    draft = Device(name="draft", bandwidth_mb_s=bandwidth_mb_s, latency_us=latency_us, gflops=1.0,
                   layer_overhead_ms=0.0, dequant_gb_s=1.0, memory_mb=memory_mb)
    draft_scenario = Scenario(name="calibration", device=draft, model=model,
                              question=Question(target_latency_ms=MAX_TARGET_MS,
                                                preload_budget_mb=0.0, min_shards_per_layer=0))
    designed, groups = designed_plans(draft_scenario, plans, seed, memory_mb,
                                      streamed_top=throttle)
    began = time.monotonic()
    kernel = IoThrottle(store.path, bandwidth_mb_s, latency_us) if throttle else None
    with kernel if kernel is not None else contextlib.nullcontext():
        if kernel is not None:
            storage, emulate = f"{kernel.describe()} (the calibration runs read through it)", False
        runs_of, rounds, fit, why = _rounds(designed, draft_scenario, store, emulate=emulate,
                                            queries=queries, repeats=repeats, budget_s=budget_s,
                                            groups=groups, log=log, no_readahead=throttle)
    for i, (name, _, plan) in enumerate(designed):
        log(f"calibration plan {i + 1}/{len(designed)} ({name}): {plan.n_shards} shards, median "
            f"latency {np.median([r.latency_ms for r in runs_of[i]]):.1f} ms")
    fit.embed_ms, fit.stderr.embed_ms = median_term(
        [r.embed_ms[1] - r.embed_ms[0] for runs in runs_of for r in runs])
    fit.pool_ms, fit.stderr.pool_ms = median_term(
        [r.pool_ms[1] - r.pool_ms[0] for runs in runs_of for r in runs])
    fit.wake_ms, fit.stderr.wake_ms = median_term(
        [g for runs in runs_of for r in runs for g in wake_gaps(r.layers, r.embed_ms[1])])
    base_device = this_machine(bandwidth_mb_s, latency_us, memory_mb)
    # The spread and the stage errors out of sample: each plan's runs predicted by the fit
    # of the other plans (a bitwidth only the left-out plan ran keeps the full fit's cost).
    samples = _samples(model, designed, runs_of)
    held_out = []
    for i, (_, sel, _) in enumerate(designed):
        rest = [smp for smp in samples if smp.plan != i]
        bits = tuple(b for b in quantised if any(smp.weights.get(b) for smp in rest))
        other = fit_compute(rest, bits)
        other.dequant_ns = {**fit.dequant_ns, **other.dequant_ns}
        other.embed_ms, other.pool_ms, other.wake_ms = fit.embed_ms, fit.pool_ms, fit.wake_ms
        held_out.append((device_of(other, base_device), sel, runs_of[i]))
    spread, errors = stage_spread(draft_scenario, held_out)
    noise = run_to_run(runs_of)
    disk = delivered = None
    if kernel is not None:
        # What `run --throttle` predicts with (costmodel.under_throttle): the disk beneath
        # the throttle, fitted to the reads its steps did not hold, and the steps; the
        # device's spread and the stage errors (refusal included) are that prediction's,
        # out of sample. The device's storage stays the throttle's settings (what the
        # planner prices, and what `run --throttle` sets the kernel to).
        steps = Steps(kernel.bps)
        lat, bw, lat_se, bw_se, r2, n, io_noise = delivered_storage(designed, runs_of,
                                                                    steps=steps)
        theirs = []
        for i, (dev, sel, runs) in enumerate(held_out):
            lat_i, bw_i, *_ = delivered_storage(designed, runs_of, plan=i, steps=steps)
            theirs.append((dataclasses.replace(dev, latency_us=lat_i, bandwidth_mb_s=bw_i),
                           sel, runs))
        linear = errors  # the throttle's settings as a linear rate
        spread, errors = stage_spread(draft_scenario, theirs, steps)
        _, per_shard = stage_spread(draft_scenario, [
            (dataclasses.replace(dev, contention_share=0.0), sel, runs)
            for dev, sel, runs in theirs], steps)
        delivered = DeliveredStorage(lat, bw, lat_se, bw_se, r2, n, io_noise, errors)
        disk = delivered.disk
        storage += (f"; {delivered.describe()}; priced at the throttle's settings as a "
                    f"linear rate instead, the same plans' stage |error| would be "
                    + "; ".join(f"{k} {m:.1f} % / {p:.1f} %" for k, (m, p) in linear.items())
                    + "; with the contention charged per shard (per MB and per read) "
                      "instead of placed in time, "
                    + "; ".join(f"{k} {m:.1f} % / {p:.1f} %"
                                for k, (m, p) in per_shard.items()))
    # the contention share is the timed replay's, which only a throttled device runs
    device = device_of(fit, base_device)
    device = dataclasses.replace(device, spread=spread, disk=disk, contention_share=(
        device.contention_share if disk is not None else 0.0))
    facts = {"storage": storage, "plans": plans, "repeats": rounds, "min_repeats": repeats,
             "stopped": why, "seconds": round(time.monotonic() - began, 1),
             "interleaved": len(groups) == 1, "noise_pct": noise, "emulated": emulate,
             "threads": torch.get_num_threads(), "seq_len": model.seq_len}
    cal = Calibration(device, fit, facts, errors, delivered)
    wide = wide_stages(errors, max_error_pct)
    if wide or noise > NOISE_FACTOR * max_error_pct or \
            max(spread.io, spread.compute) > MAX_SPREAD:
        if delivered is None:
            raise CalibrationError(refusal(cal, wide, max_error_pct))
        # --throttle: the device keeps the throttle's settings as its storage (what `run
        # --throttle` sets the kernel to); say what the reads delivered instead, and keep
        # what was measured on the error (a benchmark reports it)
        err = CalibrationError(refusal(cal, wide, max_error_pct) + f". Under the throttle "
                               f"({bandwidth_mb_s:g} MB/s, {latency_us:g} us per read): "
                               f"{delivered.describe()}")
        err.calibration = cal
        raise err
    return cal


def _rounds(designed: list, scenario: Scenario, store: ShardStore, *, emulate: bool,
            queries: list, repeats: int, budget_s: float, groups: list[list[int]],
            log: Callable[[str], None], no_readahead: bool = False
            ) -> tuple[list[list], int, Fit, str]:
    """Run the designed plans round by round (module docstring, "Rounds"), each group's
    executors open at once, until every term is tight or the budget is spent. Returns each
    plan's runs, the rounds, the last fit and why the rounds stopped."""
    model = scenario.model
    quantised = tuple(b for b in model.bitwidths if b < FULL_PRECISION_BITS)

    # --throttle: each run a fresh slice of the throttle, warm-ups included
    spacing = Spacing(THROTTLE_GAP_S if no_readahead else 0.0)

    def open_plan(i: int) -> Executor:
        ex = Executor(designed[i][2], scenario, store, emulate=emulate)
        if no_readahead:  # --throttle: each read fetches its own pages (runtime/cgroups.py)
            cgroups.no_readahead(ex.fds.values())
        try:
            ex.fill_preload()
            ex.run(queries[0])  # warm-up, discarded
            spacing.mark()
        except BaseException:
            ex.close()
            raise
        return ex

    def fit_of(runs_of: list[list]) -> tuple[Fit, list[Sample]]:
        samples = _samples(model, designed, runs_of)
        return fit_compute(samples, quantised), samples

    return measure_rounds(len(designed), open_plan=open_plan,
                          run_once=lambda ex, r: spacing.run(
                              lambda: ex.run(queries[r % len(queries)])),
                          fit_of=fit_of, repeats=repeats, budget_s=budget_s, groups=groups,
                          log=log)


def measure_rounds(plans: int, *, open_plan: Callable[[int], Any],
                   run_once: Callable[[Any, int], Any],
                   fit_of: Callable[[list[list]], tuple[Fit, list[Sample]]], repeats: int,
                   budget_s: float, groups: list[list[int]], log: Callable[[str], None]
                   ) -> tuple[list[list], int, Fit, str]:
    """The calibration rounds of any executor (module docstring, "Rounds"): `open_plan(i)`
    opens plan i's executor (filled and warmed up; closed with .close()), `run_once(ex, r)`
    is one measured run in round r, `fit_of(runs_of)` the fit of the runs so far and its
    samples. Each group's executors are open at once; every round runs every plan once;
    rounds go on until every term is tight or the budget is spent. Returns each plan's
    runs, the rounds, the last fit and why the rounds stopped."""
    runs_of: list[list] = [[] for _ in range(plans)]
    began = time.monotonic()
    rounds = 0
    open_now: dict[int, Any] = {}
    try:
        while True:
            # One round: every plan runs once, plans interleaved, so that a change in the
            # machine's speed (other work, the host) falls on every plan alike.
            for group in groups:
                if len(groups) > 1 or not open_now:
                    for i in list(open_now):
                        open_now.pop(i).close()
                    for i in group:
                        open_now[i] = open_plan(i)
                for i in group:
                    runs_of[i].append(run_once(open_now[i], rounds))
            rounds += 1
            if rounds < repeats:
                continue
            fit, samples = fit_of(runs_of)
            loose = _loose_terms(fit, samples)
            spent = time.monotonic() - began
            log(f"calibration round {rounds}: {plans} plans, {spent:.0f} s; " + (
                f"every term within {TERM_SE_PCT:g} % of the time it explains"
                if not loose else "loosest: " + ", ".join(loose[:3])))
            if not loose:
                return runs_of, rounds, fit, (f"every term's standard error within "
                                              f"{TERM_SE_PCT:g} % of the layer time it explains")
            if rounds >= MAX_ROUNDS or spent + spent / rounds > budget_s:
                return runs_of, rounds, fit, (f"the time budget ({budget_s:g} s) was spent "
                                              f"with terms still loose: " + ", ".join(loose))
    finally:
        for ex in open_now.values():
            ex.close()


def designed_plans(scenario: Scenario, plans: int, seed: int, memory_mb: float,
                   held_bits: tuple[int, ...] = (), streamed_top: bool = False
                   ) -> tuple[list[tuple[str, Selection, Plan]], list[list[int]]]:
    """The calibration plans of `design` (with its `held_bits` and `streamed_top`) on the
    scenario's model, each as (name, selection, plan), and the groups whose executors may
    be open at once (their predicted peaks within INTERLEAVE_MEMORY_SHARE of the RAM)."""
    rng = np.random.default_rng(seed)
    designed = [(name, sel, Plan.from_selection(scenario, sel, solver="calibration",
                                                status=SolveStatus.FEASIBLE, gap=None,
                                                solve_seconds=0.0))
                for name, sel in design(scenario.model, plans, rng, held_bits, streamed_top)]
    return designed, _groups([plan.memory.peak_bytes for _, _, plan in designed],
                             INTERLEAVE_MEMORY_SHARE * memory_mb * 1e6)


def _groups(peaks: list[int], cap_bytes: float) -> list[list[int]]:
    """The plans split into groups whose executors may be open at once (their predicted
    peaks sum to at most cap_bytes; a plan over it alone): one group interleaves all."""
    groups: list[list[int]] = [[]]
    held = 0
    for i, peak in enumerate(peaks):
        if groups[-1] and held + peak > cap_bytes:
            groups.append([])
            held = 0
        groups[-1].append(i)
        held += peak
    return groups


def _samples(model: ModelProfile, designed: list, runs_of: list[list]) -> list[Sample]:
    """One sample per (plan, layer that runs): its features and the median of its measured
    compute over the plan's runs (a median: one slow run does not move it)."""
    samples = []
    for i, ((_, sel, _), runs) in enumerate(zip(designed, runs_of)):
        for l, picks in enumerate(sel):
            if not picks:
                continue
            layer = model.layers[l]
            weights: dict[int, int] = {}
            for p in picks:
                bits = model.bitwidths[p.bit]
                if bits < FULL_PRECISION_BITS:
                    weights[bits] = weights.get(bits, 0) + layer.shards[p.shard].weights
            ms = float(np.median([r.layers[l].compute_end_ms - r.layers[l].compute_start_ms
                                  for r in runs]))
            streamed = sum(layer.shards[p.shard].bytes[p.bit] for p in picks if not p.preloaded)
            samples.append(Sample(l, len(picks), sum(layer.shards[p.shard].flops for p in picks),
                                  weights, ms, i, streamed / 1e6,
                                  **beside_features([concurrent(r.layers, l) for r in runs])))
    return samples


def _loose_terms(fit: Fit, samples: list[Sample]) -> list[str]:
    """The fitted terms whose standard error, times the most of their feature any sample
    has, is above TERM_SE_PCT % of the mean layer time (loosest first): a term is known
    well enough when its uncertainty moves no layer's prediction by more than that."""
    mean = float(np.mean([s.ms for s in samples]))
    se = fit.stderr
    ms_per_flop_se = se.gflops / fit.gflops ** 2 / 1e6 if fit.gflops else 0.0
    terms = [("layer_overhead_ms", se.layer_overhead_ms, 1.0),
             ("shard_overhead_ms", se.shard_overhead_ms, max(s.shards for s in samples)),
             ("gflops", ms_per_flop_se, max(s.flops for s in samples)),
             ("stream_ms_per_mb", se.stream_ms_per_mb, max(s.streamed_mb for s in samples)),
             ("contention_ms_per_mb", se.contention_ms_per_mb,
              max(s.beside_mb for s in samples)),
             ("contention_ms_per_read", se.contention_ms_per_read,
              max(s.beside_reads for s in samples))]
    terms += [(f"dequant_ns_per_weight[{b}]", ns / 1e6, max(s.weights.get(b, 0) for s in samples))
              for b, ns in se.dequant_ns.items()]
    terms += [(f"vector_ns_per_weight[{b}]", ns / 1e6,
               max(s.vector_weights.get(b, 0) for s in samples)) for b, ns in se.vector_ns.items()]
    share = sorted(((100 * err * most / mean, name) for name, err, most in terms), reverse=True)
    return [f"{name} +-{pct:.1f} %" for pct, name in share if pct > TERM_SE_PCT]


def run_to_run(runs_of: list[list]) -> float:
    """The machine's own noise, in %: a robust sigma of log(run / its plan's median latency)
    over every run (1.4826 x the median absolute value: a few very slow runs, which a
    median of runs shrugs off, do not inflate it as they do a root mean square)."""
    logs = [abs(math.log(r.latency_ms / m)) for runs in runs_of
            for m in [float(np.median([r.latency_ms for r in runs]))] for r in runs]
    return round(100 * 1.4826 * float(np.median(logs)), 2) if logs else 0.0


def wide_stages(errors: dict[str, tuple[float, float]], max_error_pct: float) -> list[str]:
    """The stages whose out-of-sample error is wide: median |error| above max_error_pct,
    or p95 above P95_FACTOR times it."""
    return [k for k, (median, p95) in errors.items()
            if median > max_error_pct or p95 > P95_FACTOR * max_error_pct]


def refusal(cal: Calibration, wide: list[str], max_error_pct: float) -> str:
    """Why calibrate writes nothing: which stages, by how much, the machine's noise, and
    what to try."""
    facts = cal.facts
    noise = facts["noise_pct"]
    stages = "; ".join(f"{k} median {cal.stage_errors[k][0]:.1f} % / p95 "
                       f"{cal.stage_errors[k][1]:.1f} %" for k in wide)
    what = []
    if wide:
        what.append(f"the calibrated device does not predict its own calibration runs: out of "
                    f"sample (each plan's median run predicted by the fit of the others, in "
                    f"% of its latency) {stages}, wider than --max-error-pct {max_error_pct:g} (median; p95 "
                    f"{P95_FACTOR:g}x that)")
    spread = cal.device.spread
    for stage, value in (("IO", spread.io), ("compute", spread.compute)):
        if value > MAX_SPREAD:
            what.append(f"the {stage} stage's runs spread {value:.2f} (rms of log measured / "
                        f"predicted) around their predictions, beyond the {MAX_SPREAD:g} a "
                        f"device may carry")
    if noise > NOISE_FACTOR * max_error_pct:
        what.append(f"this machine is too noisy to promise --max-error-pct {max_error_pct:g}: "
                    f"the same plan ran {noise:.1f} % apart run to run (robust sigma), so even an exact "
                    f"model's median of 5 runs would miss by {noise / NOISE_FACTOR:.1f} % "
                    f"(one standard error)")
    disk = ""
    if "io" in wide and facts.get("emulated"):
        disk = ("; the IO stage running long under emulation means this machine's disk does "
                "not serve the plans' cold reads as fast as the emulated storage: emulate "
                "slower storage (--storage-mb-s) or use the real disk (omit it)")
    return ("; and ".join(what) + f". Measured over {facts['repeats']} interleaved rounds in "
            f"{facts['seconds']:.0f} s (run-to-run noise {noise:.1f} %, robust sigma). Nothing was "
            f"written. Try fewer background jobs (the machine's speed varies under them), more "
            f"rounds (--repeats, --budget-s), or accept wider errors with --max-error-pct"
            + disk)


def median_term(values: list[float]) -> tuple[float, float]:
    """A term measured directly: the median of its samples and its standard error ((0, 0)
    without samples; the error 0 with one)."""
    if not values:
        return 0.0, 0.0
    return float(np.median(values)), _median_stderr(values) if len(values) > 1 else 0.0


def wake_gaps(parts: list, start_ms: float) -> list[float]:
    """The compute thread's wake-ups in one pass over `parts` (LayerTraces, in order; the
    first's predecessor ends at start_ms): how long after its reads end a part that waited
    for them starts computing (the one before had finished: it was waiting on the reads)."""
    return [t.compute_start_ms - t.io_end_ms for l, t in enumerate(parts)
            if t.reads and t.compute_start_ms >= t.io_end_ms
            and (parts[l - 1].compute_end_ms if l else start_ms) < t.io_end_ms]


def this_machine(bandwidth_mb_s: float, latency_us: float, memory_mb: float) -> Device:
    """The calibrated device before its compute terms: this machine's storage and RAM."""
    return Device(name="this-machine", bandwidth_mb_s=round(float(bandwidth_mb_s), 3),
                  latency_us=round(float(latency_us), 3), gflops=1.0, layer_overhead_ms=0.0,
                  dequant_gb_s=None, memory_mb=round(float(memory_mb), 1))


def _median_stderr(values: list[float]) -> float:
    """Standard error of a median: 1.2533 sigma / sqrt(n), sigma from the MAD (robust)."""
    v = np.asarray(values, dtype=float)
    sigma = 1.4826 * float(np.median(np.abs(v - np.median(v))))
    return 1.2533 * sigma / math.sqrt(len(v))


STAGES = ("io", "compute", "total")


def device_of(fit: Fit, base: Device) -> Device:
    """The device a fit describes: `base`'s storage and memory with the fitted compute."""
    return dataclasses.replace(
        base, gflops=round(float(fit.gflops), 4), layer_overhead_ms=round(fit.layer_overhead_ms, 5),
        dequant_gb_s=None, shard_overhead_ms=round(fit.shard_overhead_ms, 6),
        dequant_ns_per_weight=tuple((b, round(ns, 5)) for b, ns in sorted(fit.dequant_ns.items())),
        vector_ns_per_weight=tuple((b, round(ns, 5)) for b, ns in sorted(fit.vector_ns.items())),
        stream_ms_per_mb=round(fit.stream_ms_per_mb, 6),
        contention_ms_per_mb=round(fit.contention_ms_per_mb, 6),
        contention_ms_per_read=round(fit.contention_ms_per_read, 6),
        contention_share=round(fit.contention_share, 5), embed_ms=round(fit.embed_ms, 5),
        pool_ms=round(fit.pool_ms, 5), wake_ms=round(fit.wake_ms, 5))


def _stage_totals(run) -> dict[str, float]:
    """A schedule's or a measured run's stages: the layers' read intervals summed, their
    compute intervals summed, and the latency."""
    return {"io": sum(t.io_end_ms - t.io_start_ms for t in run.layers),
            "compute": sum(t.compute_end_ms - t.compute_start_ms for t in run.layers),
            "total": run.latency_ms}


def stage_spread(scenario: Scenario, held_out: list, steps: Steps | None = None
                 ) -> tuple[Spread, dict[str, tuple[float, float]]]:
    """Every run against its prediction on the device given beside it (device, plan, runs),
    per stage: the spread (root mean square of log(measured / predicted) over every run)
    of IO and compute, and each stage's median and p95 over plans of the |error| of the
    plan's median run, in % of the plan's predicted latency (total: of itself). In % of
    the latency, a stage's error weighs what it adds to the total: a plan that reads for
    2 ms of 80 and reads 0.4 ms late is 0.5 % off, not 20 %; and a median over runs is
    the model's error, which the runs' own noise (run_to_run) swamps in a single run.
    `steps`: the reads held to a kernel throttle's (calibrate --throttle)."""
    logs: dict[str, list[float]] = {k: [] for k in STAGES}
    off: dict[str, list[float]] = {k: [] for k in STAGES}
    for device, sel, runs in held_out:
        predicted = _stage_totals(simulate(scenario.with_overrides(device=device), sel,
                                           steps=steps))
        measured = [_stage_totals(r) for r in runs]
        for k in STAGES:
            if predicted[k] <= 0:
                continue
            logs[k] += [math.log(m[k] / predicted[k]) for m in measured if m[k] > 0]
            median = float(np.median([m[k] for m in measured]))
            off[k].append(100 * abs(median - predicted[k]) / predicted["total"])
    rms = {k: math.sqrt(float(np.mean(np.square(v)))) if v else 0.0 for k, v in logs.items()}
    errors = {k: (float(np.median(v)), float(np.percentile(v, 95))) if v else (0.0, 0.0)
              for k, v in off.items()}
    runs = sum(len(r) for _, _, r in held_out)
    return Spread(io=round(rms["io"], 5), compute=round(rms["compute"], 5), runs=runs), errors


def storage_of(store: ShardStore, bandwidth_mb_s: float | None, latency_us: float,
               warm_reads: bool = False) -> tuple[float, float, str, bool]:
    """The calibration's storage: (bandwidth MB/s, latency us, its description for the
    file header, whether runs emulate it): emulated at the given bandwidth (`warm_reads`:
    on reads from the page cache, the decode executor's), or, without one, this machine's
    disk measured (measure_disk) and used as it is."""
    if bandwidth_mb_s is None:
        bandwidth_mb_s, latency_us = measure_disk(store)
        return (bandwidth_mb_s, latency_us,
                f"this machine's disk, measured: cold single reads, {bandwidth_mb_s:.0f} MB/s "
                f"+ {latency_us:.0f} us per read (runs use it without emulation)", False)
    return (bandwidth_mb_s, latency_us,
            f"emulated at {bandwidth_mb_s:g} MB/s + {latency_us:g} us per read "
            f"(runs emulate it on top of real "
            f"{'reads from the page cache (--warm-reads)' if warm_reads else 'cold reads'})",
            True)


def machine_memory_mb() -> float:
    """This machine's RAM, MB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e6


def measure_disk(store: ShardStore, layers=(1, 4)) -> tuple[float, float]:
    """(bandwidth MB/s, latency us) of this machine's disk, from cold single reads."""
    xs, ts = [], []
    for l in layers:
        for bits in store.bitwidths:
            vs = [store.variant(l, n, bits) for n in store.config.shard_names()]
            fd = store.open_file(vs[0].file)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # one read = one request
                evict(fd)
                for v in vs:
                    buf = bytearray(v.nbytes)
                    t = time.perf_counter()
                    os.preadv(fd, [buf], v.offset)
                    ts.append(time.perf_counter() - t)
                    xs.append(v.nbytes)
            finally:
                os.close(fd)
    A = np.column_stack([np.ones(len(xs)), np.array(xs, float)])
    (lat_s, s_per_byte), _ = scipy.optimize.nnls(A, np.array(ts))
    if s_per_byte <= 0:
        raise CalibrationError("the disk fit is degenerate; pass --storage-mb-s")
    return 1.0 / (s_per_byte * 1e6), lat_s * 1e6


def device_dict(device: Device) -> dict:
    compute = {"gflops": device.gflops, "layer_overhead_ms": device.layer_overhead_ms,
               "shard_overhead_ms": device.shard_overhead_ms}
    if device.dequant_gb_s is not None:
        compute["dequant_gb_s"] = device.dequant_gb_s
    if device.dequant_ns_per_weight:
        compute["dequant_ns_per_weight"] = dict(device.dequant_ns_per_weight)
    if device.vector_ns_per_weight:
        compute["vector_ns_per_weight"] = dict(device.vector_ns_per_weight)
    compute.update(embed_ms=device.embed_ms, pool_ms=device.pool_ms, wake_ms=device.wake_ms,
                   stream_ms_per_mb=device.stream_ms_per_mb,
                   contention_ms_per_mb=device.contention_ms_per_mb)
    if device.contention_ms_per_read:
        compute["contention_ms_per_read"] = device.contention_ms_per_read
    if device.contention_share:
        compute["contention_share"] = device.contention_share
    out = {"name": device.name,
           "description": "This machine's compute, calibrated in the pipelined runtime, with "
                          "the storage stated in the header",
           "storage": {"bandwidth_mb_s": device.bandwidth_mb_s, "latency_us": device.latency_us},
           "compute": compute}
    if device.disk is not None:  # calibrate --throttle: the disk beneath the throttle
        out["storage"]["disk"] = {"bandwidth_mb_s": device.disk.bandwidth_mb_s,
                                  "latency_us": device.disk.latency_us}
    if device.spread is not None:
        out["spread"] = {"io": device.spread.io, "compute": device.spread.compute,
                         "runs": device.spread.runs}
    out["memory_mb"] = device.memory_mb
    return out


def describe_compute(device: Device) -> str:
    """The compute terms of a device, on one line."""
    parts = [f"gflops {device.gflops:g}", f"layer_overhead_ms {device.layer_overhead_ms:g}"]
    if device.shard_overhead_ms:
        parts.append(f"shard_overhead_ms {device.shard_overhead_ms:g}")
    if device.dequant_gb_s is not None:
        parts.append(f"dequant_gb_s {device.dequant_gb_s:g}")
    if device.dequant_ns_per_weight:
        parts.append("dequant ns/weight " + ", ".join(f"{b}b {ns:.3g}"
                                                      for b, ns in device.dequant_ns_per_weight))
    if device.vector_ns_per_weight:
        parts.append("one-vector ns/weight " + ", ".join(
            f"{b}b {ns:.3g}" for b, ns in device.vector_ns_per_weight))
    if device.stream_ms_per_mb:
        parts.append(f"stream_ms_per_mb {device.stream_ms_per_mb:g}")
    if device.contention_ms_per_mb:
        parts.append(f"contention_ms_per_mb {device.contention_ms_per_mb:g}")
    if device.contention_ms_per_read:
        parts.append(f"contention_ms_per_read {device.contention_ms_per_read:g}")
    if device.contention_share:
        parts.append(f"contention_share {device.contention_share:g}")
    if device.embed_ms or device.pool_ms or device.wake_ms:
        parts.append(f"embed_ms {device.embed_ms:g}, pool_ms {device.pool_ms:g}, "
                     f"wake_ms {device.wake_ms:g}")
    return ", ".join(parts)


def fit_report(cal: Calibration) -> str:
    """What the file header and the command print about the fit: each term with its
    standard error, the residual per layer, the calibration runs' stage errors, the spread."""
    fit, d = cal.fit, cal.device
    se = fit.stderr
    terms = [f"layer_overhead_ms {fit.layer_overhead_ms:.4f} +- {se.layer_overhead_ms:.4f}",
             f"shard_overhead_ms {fit.shard_overhead_ms:.5f} +- {se.shard_overhead_ms:.5f}",
             f"gflops {fit.gflops:.2f} +- {se.gflops:.2f}"]
    terms += [f"dequant_ns_per_weight[{b}] {ns:.3f} +- {se.dequant_ns[b]:.3f}"
              for b, ns in fit.dequant_ns.items()]
    terms += [f"vector_ns_per_weight[{b}] {ns:.3f} +- {se.vector_ns[b]:.3f}"
              for b, ns in fit.vector_ns.items()]
    terms += [f"stream_ms_per_mb {fit.stream_ms_per_mb:.4f} +- {se.stream_ms_per_mb:.4f}",
              f"contention_ms_per_mb {fit.contention_ms_per_mb:.4f} +- "
              f"{se.contention_ms_per_mb:.4f}",
              f"contention_ms_per_read {fit.contention_ms_per_read:.5f} +- "
              f"{se.contention_ms_per_read:.5f}",
              f"contention_share {fit.contention_share:.4f} +- {se.contention_share:.4f} "
              f"(in place of the two above where the reads are placed in time)"]
    terms += [f"embed_ms {fit.embed_ms:.4f} +- {se.embed_ms:.4f}",
              f"pool_ms {fit.pool_ms:.4f} +- {se.pool_ms:.4f}",
              f"wake_ms {fit.wake_ms:.4f} +- {se.wake_ms:.4f}"]
    residuals = ", ".join(f"{ms:+.3f} ms ({pct:+.1f}%)"
                          for ms, pct in zip(fit.layer_residuals_ms, fit.layer_residuals_pct))
    errors = "; ".join(f"{k} {m:.1f} % / {p:.1f} %" for k, (m, p) in cal.stage_errors.items())
    notes = "".join(f"Note: {n}.\n" for n in fit.notes)
    return (notes + f"Fit over {fit.samples} layer samples: R^2 {fit.r2:.3f}, mean abs error "
            f"{fit.mae_ms:.3f} ms per layer; terms (standard error):\n  " + ";\n  ".join(terms)
            + f".\nResidual (measured - predicted) per layer, mean: {residuals}.\n"
            f"Stage |error| of the calibration plans (each plan's median run, in % of its "
            f"latency), each predicted by the fit of the others, median / p95 over plans: "
            f"{errors}.\n"
            f"Spread (rms of log measured/predicted, same runs, {d.spread.runs}): IO "
            f"{d.spread.io:.4f}, compute {d.spread.compute:.4f}; the machine's own run-to-run "
            f"noise (robust sigma, same plan): {cal.facts.get('noise_pct', 0.0):.1f} %.")


def write_calibration(out_dir: Path, base: Scenario, cal: Calibration,
                      target_ms: float | None) -> tuple[Path, Path, float]:
    """Write device.yaml and scenario.yaml (the base scenario's model and question on the
    calibrated device). Returns both paths and the scenario's target."""
    device, facts = cal.device, cal.facts
    device_path, scenario_path = out_dir / "device.yaml", out_dir / "scenario.yaml"
    for path in (device_path, scenario_path):  # before anything is written
        refuse_inputs(path, base.files)
    out_dir.mkdir(parents=True, exist_ok=True)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    header = (f"Written by `elasticplan calibrate` on {platform.node()} ({os.cpu_count()} cores), "
              f"{when}.\n"
              f"Compute: measured inside the pipelined runtime (torch threads "
              f"{facts['threads']}, batch 1, " + (
                  f"a {facts['seq_len']}-token prompt and {facts['decode_steps']} decode "
                  f"steps per run; runtime/decode_calibrate.py" if "decode_steps" in facts
                  else f"seq_len {facts['seq_len']}") + "),\n"
              f"  {facts['plans']} designed plans x {facts['repeats']} rounds, interleaved "
              f"{'' if facts['interleaved'] else 'in groups that fit a quarter of the RAM '}"
              f"(at least {facts['min_repeats']}; {facts['seconds']:g} s; stopped: "
              f"{facts['stopped']}).\n"
              + fit_report(cal) + "\n"
              f"Storage: {facts['storage']}.\n"
              f"Memory: this machine's RAM.")
    write_checked_yaml(device_path, device_dict(device), header, parse_device)
    decoding = base.question.decoding
    if target_ms is None and decoding:
        # A decoder's default question: twice hold-in-memory's per-token latency (every
        # part fp32, resident) on this device, at the last token.
        from elasticplan.decoding import predict

        sc = base.with_overrides(device=device)
        full = base.model.bit_index(FULL_PRECISION_BITS)
        sel = every_shard(base.model, full, True)
        target_ms = round(2 * predict(sc, sel, Layout()).last_token_ms, 1)
    elif target_ms is None:
        # Default question: the latency of every shard at 8 bits, streamed, on this device:
        # tight enough that the plan must trade bitwidths, preloading and shards.
        sc = Scenario(name="t", device=device, model=base.model,
                      question=Question(target_latency_ms=1.0, preload_budget_mb=0.0))
        b8 = base.model.bit_index(8) if base.model.bit_index(8) is not None else 0
        sel = every_shard(base.model, b8, False)
        target_ms = round(simulate(sc, sel).latency_ms, 1)
    model_rel = os.path.relpath(Path(base.source).parent / _model_file(base), out_dir)
    scenario = {"name": f"{base.model.name}-this-machine",
                "description": f"{base.name}'s question on this machine's calibrated device",
                "device": "device.yaml", "model": model_rel,
                "target_latency_ms": target_ms, "preload_budget_mb": base.preload_budget_mb,
                "min_shards_per_layer": base.min_shards_per_layer,
                "objective": base.objective.value}
    if decoding:  # (its first-token target, the device's own, is not carried over)
        scenario.update(prompt_tokens=base.question.prompt_tokens,
                        answer_tokens=base.question.answer_tokens)
        if base.question.kv_bits is not None:
            scenario["kv_bits"] = base.question.kv_bits
    # the rest of the base question, as it was posed
    for key, value in (("importance_floor", base.importance_floor),
                       ("memory_budget_mb", base.memory_budget_mb),
                       ("prefetch_window", base.prefetch_window),
                       ("latency_quantile", base.latency_quantile
                        if base.latency_quantile != 0.5 else None)):
        if value is not None:
            scenario[key] = value
    write_checked_yaml(scenario_path, scenario, f"Written by `elasticplan calibrate`, {when}: "
                       f"{base.source} on device.yaml.", lambda d, f: None)
    load_scenario(scenario_path)  # it must load (paths resolve, fields valid)
    return device_path, scenario_path, target_ms


def _model_file(base: Scenario) -> str:
    from elasticplan.problem.loader import read_yaml

    model = read_yaml(base.source).get("model")
    if not isinstance(model, str):
        raise CalibrationError(f"{base.source}: calibrate needs a scenario whose model is a "
                               f"file path, not an inline mapping")
    return model

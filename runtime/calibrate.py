"""`elasticplan calibrate`: measure this machine's compute costs inside the pipelined
runtime and write a device spec ("this machine + storage at X MB/s") and a scenario on it.

Compute. The device spec's compute model is, per layer that runs,
    layer_ms = layer_overhead_ms + sum(flops) / gflops + sum(quantised stored bytes) / dequant
(elasticplan.costmodel). Calibration runs random plans (random shard subsets, bitwidths
and preload flags per layer, seeded) through the real executor, with the storage emulated
as it will be in real runs, so the measured layer times carry the pipeline's own effects
(idle OpenMP threads, the IO thread; docs/runtime.md, "Measured facts"). Each plan runs after a discarded
warm-up; each (plan, layer) sample is the median over the repeats. The three figures come
from a non-negative least-squares fit of the measured compute times to the model, and
the fit's R^2 and mean error are written into the file.

Storage. With `bandwidth_mb_s` given, the device's storage is that (emulated in runs).
Without it, this machine's disk is measured: cold single reads of every variant of two
layers, fit to latency + bytes / bandwidth, for runs without emulation.
"""

from __future__ import annotations

import datetime
import itertools
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from elasticplan.costmodel import Pick
from elasticplan.errors import CalibrationError
from elasticplan.loader import load_scenario, parse_device, write_checked_yaml
from elasticplan.outputs import refuse_inputs
from elasticplan.plan import Plan, SolveStatus
from elasticplan.spec import FULL_PRECISION_BITS, MAX_TARGET_MS, Device, Scenario
from runtime.executor import Executor
from runtime.iodev import evict
from runtime.store import ShardStore

DEFAULT_LATENCY_US = 100.0
DEFAULT_PLANS = 16
DEFAULT_REPEATS = 3


@dataclass
class Fit:
    layer_overhead_ms: float
    gflops: float
    dequant_gb_s: float
    r2: float
    mae_ms: float
    samples: int


def nnls(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0, exactly, for a handful of columns (every active set)."""
    best, best_res = np.zeros(A.shape[1]), float(np.sum(y ** 2))
    for k in range(1, A.shape[1] + 1):
        for cols in itertools.combinations(range(A.shape[1]), k):
            x_sub, *_ = np.linalg.lstsq(A[:, cols], y, rcond=None)
            if np.all(x_sub >= 0):
                x = np.zeros(A.shape[1])
                x[list(cols)] = x_sub
                res = float(np.sum((A @ x - y) ** 2))
                if res < best_res:
                    best, best_res = x, res
    return best


def fit_compute(samples: list[tuple[float, float, float]]) -> Fit:
    """samples: (flops, quantised stored bytes, measured ms) per executed layer."""
    a = np.array(samples, dtype=float)
    A = np.column_stack([np.ones(len(a)), a[:, 0], a[:, 1]])
    y = a[:, 2]
    overhead, ms_per_flop, ms_per_byte = nnls(A, y)
    if ms_per_flop <= 0 or ms_per_byte <= 0:
        raise CalibrationError(f"the compute fit is degenerate (ms per flop {ms_per_flop:.3g}, "
                               f"ms per quantised byte {ms_per_byte:.3g}); rerun with more "
                               f"plans (--plans)")
    pred = A @ np.array([overhead, ms_per_flop, ms_per_byte])
    ss_tot = float(np.sum((y - y.mean()) ** 2)) or 1.0
    return Fit(layer_overhead_ms=float(overhead), gflops=1.0 / (ms_per_flop * 1e6),
               dequant_gb_s=1.0 / (ms_per_byte * 1e6),
               r2=1.0 - float(np.sum((y - pred) ** 2)) / ss_tot,
               mae_ms=float(np.mean(np.abs(y - pred))), samples=len(y))


def random_selection(scenario: Scenario, rng: np.random.Generator) -> tuple:
    model = scenario.model
    out = []
    for layer in model.layers:
        n = len(layer.shards)
        k = int(rng.integers(1, n + 1))
        picks = [Pick(int(s), int(rng.integers(len(model.bitwidths))), bool(rng.random() < 0.25))
                 for s in rng.choice(n, size=k, replace=False)]
        out.append(tuple(picks))
    return tuple(out)


def measure_disk(store: ShardStore, layers=(1, 4)) -> tuple[float, float]:
    """(bandwidth MB/s, latency us) of this machine's disk, from cold single reads."""
    xs, ts = [], []
    for l in layers:
        for bits in store.bitwidths:
            vs = [store.variant(l, n, bits) for n in store.config.shard_names()]
            fd = os.open(store.file(vs[0].file), os.O_RDONLY)
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
    lat_s, s_per_byte = nnls(A, np.array(ts))
    if s_per_byte <= 0:
        raise CalibrationError("the disk fit is degenerate; pass --storage-mb-s")
    return 1.0 / (s_per_byte * 1e6), lat_s * 1e6


def calibrate(store: ShardStore, base: Scenario, *, bandwidth_mb_s: float | None,
              latency_us: float, plans: int = DEFAULT_PLANS, repeats: int = DEFAULT_REPEATS,
              seed: int = 0, queries: list | None = None,
              log: Callable[[str], None] = lambda s: None) -> tuple[Device, Fit, dict]:
    """Measure; return the calibrated device, the compute fit and facts for the file header."""
    if bandwidth_mb_s is None:
        bandwidth_mb_s, latency_us = measure_disk(store)
        storage = (f"this machine's disk, measured: cold single reads, {bandwidth_mb_s:.0f} MB/s "
                   f"+ {latency_us:.0f} us per read (runs use it without emulation)")
        emulate = False
    else:
        storage = (f"emulated at {bandwidth_mb_s:g} MB/s + {latency_us:g} us per read "
                   f"(runs emulate it on top of real cold reads)")
        emulate = True
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e6
    draft = Device(name="draft", bandwidth_mb_s=bandwidth_mb_s, latency_us=latency_us, gflops=1.0,
                   layer_overhead_ms=0.0, dequant_gb_s=1.0, memory_mb=memory_mb)
    draft_scenario = Scenario(name="calibration", device=draft, model=base.model,
                              target_latency_ms=MAX_TARGET_MS, preload_budget_mb=0.0,
                              min_shards_per_layer=0)
    batch = queries[0]
    model = base.model
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(plans):
        sel = random_selection(draft_scenario, rng)
        plan = Plan.from_selection(draft_scenario, sel, solver="calibration",
                                   status=SolveStatus.FEASIBLE, gap=None, solve_seconds=0.0)
        with Executor(plan, draft_scenario, store, emulate=emulate) as ex:
            ex.fill_preload()
            ex.run(batch)  # warm-up, discarded
            runs = [ex.run(queries[r % len(queries)]) for r in range(repeats)]
        for l, picks in enumerate(sel):
            if not picks:
                continue
            layer = model.layers[l]
            flops = sum(layer.shards[p.shard].flops for p in picks)
            qbytes = sum(layer.shards[p.shard].bytes[p.bit] for p in picks
                         if model.bitwidths[p.bit] < FULL_PRECISION_BITS)
            ms = float(np.median([r.layers[l].compute_end_ms - r.layers[l].compute_start_ms
                                  for r in runs]))
            samples.append((flops, qbytes, ms))
        log(f"calibration plan {i + 1}/{plans}: {plan.n_shards} shards, median latency "
            f"{np.median([r.latency_ms for r in runs]):.1f} ms")
    fit = fit_compute(samples)
    device = Device(name="this-machine", bandwidth_mb_s=round(float(bandwidth_mb_s), 3),
                    latency_us=round(float(latency_us), 3), gflops=round(float(fit.gflops), 4),
                    layer_overhead_ms=round(float(fit.layer_overhead_ms), 5),
                    dequant_gb_s=round(float(fit.dequant_gb_s), 5),
                    memory_mb=round(float(memory_mb), 1))
    facts = {"storage": storage, "plans": plans, "repeats": repeats,
             "threads": torch.get_num_threads(), "seq_len": model.seq_len}
    return device, fit, facts


def device_dict(device: Device) -> dict:
    return {"name": device.name,
            "description": "This machine's compute, calibrated in the pipelined runtime, with "
                           "the storage stated in the header",
            "storage": {"bandwidth_mb_s": device.bandwidth_mb_s, "latency_us": device.latency_us},
            "compute": {"gflops": device.gflops, "layer_overhead_ms": device.layer_overhead_ms,
                        "dequant_gb_s": device.dequant_gb_s},
            "memory_mb": device.memory_mb}


def write_calibration(out_dir: Path, base: Scenario, device: Device, fit: Fit, facts: dict,
                      target_ms: float | None) -> tuple[Path, Path, float]:
    """Write device.yaml and scenario.yaml (the base scenario's model and question on the
    calibrated device). Returns both paths and the scenario's target."""
    from elasticplan.costmodel import simulate

    device_path, scenario_path = out_dir / "device.yaml", out_dir / "scenario.yaml"
    for path in (device_path, scenario_path):  # before anything is written
        refuse_inputs(path, base.files)
    out_dir.mkdir(parents=True, exist_ok=True)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    header = (f"Written by `elasticplan calibrate` on {platform.node()} ({os.cpu_count()} cores), "
              f"{when}.\n"
              f"Compute: measured inside the pipelined runtime (torch threads "
              f"{facts['threads']}, batch 1, seq_len {facts['seq_len']}),\n"
              f"  {facts['plans']} random plans x {facts['repeats']} repeats, {fit.samples} "
              f"layer samples; fit layer_ms = overhead + flops/gflops + quantised bytes/dequant:\n"
              f"  R^2 {fit.r2:.3f}, mean abs error {fit.mae_ms:.3f} ms per layer.\n"
              f"Storage: {facts['storage']}.\n"
              f"Memory: this machine's RAM.")
    write_checked_yaml(device_path, device_dict(device), header, parse_device)
    if target_ms is None:
        # Default question: the latency of every shard at 8 bits, streamed, on this device:
        # tight enough that the plan must trade bitwidths, preloading and shards.
        sc = Scenario(name="t", device=device, model=base.model, target_latency_ms=1.0,
                      preload_budget_mb=0.0)
        b8 = base.model.bit_index(8) if base.model.bit_index(8) is not None else 0
        sel = tuple(tuple(Pick(s, b8, False) for s in range(len(layer.shards)))
                    for layer in base.model.layers)
        target_ms = round(simulate(sc, sel).latency_ms, 1)
    model_rel = os.path.relpath(Path(base.source).parent / _model_file(base), out_dir)
    scenario = {"name": f"{base.model.name}-this-machine",
                "description": f"{base.name}'s question on this machine's calibrated device",
                "device": "device.yaml", "model": model_rel,
                "target_latency_ms": target_ms, "preload_budget_mb": base.preload_budget_mb,
                "min_shards_per_layer": base.min_shards_per_layer,
                "objective": base.objective.value}
    if base.importance_floor is not None:
        scenario["importance_floor"] = base.importance_floor
    write_checked_yaml(scenario_path, scenario, f"Written by `elasticplan calibrate`, {when}: "
                       f"{base.source} on device.yaml.", lambda d, f: None)
    load_scenario(scenario_path)  # it must load (paths resolve, fields valid)
    return device_path, scenario_path, target_ms


def _model_file(base: Scenario) -> str:
    from elasticplan.loader import read_yaml

    model = read_yaml(base.source).get("model")
    if not isinstance(model, str):
        raise CalibrationError(f"{base.source}: calibrate needs a scenario whose model is a "
                               f"file path, not an inline mapping")
    return model

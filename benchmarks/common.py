"""What every benchmark shares: its header line (command, machine, date), where it writes,
CSV, plots, statistics, and the calibrated devices of the runtime benchmarks.

Benchmarks run from the repository root as modules: `python -m benchmarks.<name>`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from elasticplan.problem import outputs
from runtime.schemes import DEFAULT_NAME

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "bench"
CALIBRATED = ROOT / "build" / "bench"
STORE = ROOT / "build" / "shards" / "minilm-l6"
HEAD = ROOT / "problems" / "models" / "minilm-l6.taskhead.json"
MINILM_PHONE = ROOT / "problems" / "scenarios" / "minilm-phone.yaml"
# The dictionary store (`elasticplan shard --scheme dict`), its profile's scenario and head.
DICT_STORE = ROOT / "build" / "shards" / "minilm-l6-dict"
DICT_PHONE = ROOT / "problems" / "scenarios" / "minilm-phone-dict.yaml"
DICT_HEAD = ROOT / "problems" / "models" / "minilm-l6-dict.taskhead.json"
SCHEMES = {DEFAULT_NAME: (STORE, MINILM_PHONE, HEAD), "dict": (DICT_STORE, DICT_PHONE, DICT_HEAD)}
EXACT = "highs"  # the default backend (elasticplan.solvers.DEFAULT_SOLVER)
GREEDY = "greedy"


def header(module: str, argv: list[str] | None = None, **facts) -> str:
    """'# python -m benchmarks.X ARGS; host, N cores, arch, Python, date[, k v ...]'."""
    args = sys.argv[1:] if argv is None else argv
    extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in facts.items())
    return (f"# {' '.join(['python -m', module] + list(args))}; {platform.node()}, "
            f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
            f"{datetime.date.today()}{extra}")


def start(module: str, argv: list[str] | None = None) -> str:
    """A benchmark's start: one torch thread (the runtime's default: the IO thread needs
    the other core), and its header printed. Returns the header (for figure footers)."""
    import torch

    torch.set_num_threads(1)
    command = header(module, argv, torch_threads=1)
    print(command)
    return command


BUSY_LOOP = """
import ctypes, os, signal
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != {parent}:
    raise SystemExit(0)
os.sched_setaffinity(0, {{{core}}})
while True:
    pass
"""


@contextlib.contextmanager
def busy_core(core: int | None):
    """With a core number: a busy loop pinned to that core (a separate process) for the
    block's duration, the "other work" of a busy machine, said so on stdout; None: nothing."""
    if core is None:
        yield
        return
    if core not in os.sched_getaffinity(0):
        raise SystemExit(f"--busy-core {core}: this machine's cores are "
                         f"{sorted(os.sched_getaffinity(0))}")
    # The loop dies with this process, however it ends (a SIGTERM skips the finally below):
    # the kernel kills it when its parent goes (PR_SET_PDEATHSIG), checked after the call.
    loop = subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(parent=os.getpid(),
                                                                    core=core)])
    print(f"# busy machine: a busy loop (pid {loop.pid}) pinned to core {core} runs throughout")
    try:
        yield
    finally:
        loop.kill()
        loop.wait()


def runtime_inputs(repeat: int, scheme: str = DEFAULT_NAME):
    """What the runtime benchmarks measure with: the shard store (the scheme's), the fp32
    reference, and `repeat` test-split queries at MiniLM's profiled seq_len."""
    from elasticplan.problem.loader import load_scenario
    from runtime.measurement.measure import Reference, query_batches
    from runtime.store import ShardStore

    store_path, phone, _ = SCHEMES[scheme]
    store = ShardStore(store_path)
    seq_len = load_scenario(phone).model.seq_len
    return store, Reference(store), query_batches(store, seq_len, repeat)


def out_path(name: str, out_dir: str | Path | None = None) -> Path:
    d = Path(out_dir) if out_dir else OUT
    d.mkdir(parents=True, exist_ok=True)
    return d / name


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    outputs.write_csv(path, rows, fields)
    print(f"# written {_rel(path)}")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, command: str) -> None:
    """Save with the command that made it in the figure's own footer."""
    fig.text(0.005, 0.005, command.lstrip("# "), fontsize=5.5, color="grey", va="bottom")
    try:
        outputs.save_figure(fig, path)
    finally:
        pyplot().close(fig)
    print(f"# written {_rel(path)}")


def percentile(values, q: float) -> float:
    """The q-th percentile (linear interpolation, numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def relative(measured: float, predicted: float) -> float:
    """(measured - predicted) / predicted; inf when nothing was predicted but time passed."""
    if predicted > 0:
        return (measured - predicted) / predicted
    return 0.0 if measured == 0 else float("inf")


def time_alternated(calls: list, repeats: int, rounds: int = 9, warmup: int = 20
                    ) -> list[float]:
    """Median ms per call of each of `calls`, timed side by side: after `warmup` calls of
    each, `rounds` rounds in which each runs `repeats` times in turn; one torch thread, in
    inference mode (as the executor decodes)."""
    import statistics
    import time

    import torch

    torch.set_num_threads(1)
    times: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for fn in calls:
            for _ in range(warmup):
                fn()
        for _ in range(rounds):
            for fn, t in zip(calls, times):
                t0 = time.perf_counter()
                for _ in range(repeats):
                    fn()
                t.append((time.perf_counter() - t0) / repeats * 1e3)
    return [statistics.median(t) for t in times]


def calibrated_scenario(bandwidth_mb_s: float, *, store, queries, log=print,
                        scheme: str = DEFAULT_NAME):
    """MiniLM's question on this machine with storage emulated at `bandwidth_mb_s`.

    Calibrates once (as `elasticplan calibrate` does; ~10 s) into build/bench/calibrated-X
    and reuses that on later calls, so the benchmarks of one `make bench` run share one
    device per bandwidth (`make bench` deletes them first: every run calibrates afresh),
    unless the store's index, the scenario, its profile or the task head changed since
    (a rebuilt store decodes at other costs). The dictionary scheme's store and profile
    calibrate into calibrated-X-dict. Returns (scenario, default target ms)."""
    import yaml

    from elasticplan.problem.loader import load_scenario
    from runtime.calibrate import DEFAULT_LATENCY_US, calibrate, describe_compute, write_calibration

    out = CALIBRATED / f"calibrated-{bandwidth_mb_s:g}{'' if scheme == 'uniform' else '-' + scheme}"
    path = out / "scenario.yaml"
    store_dir, scenario, head = SCHEMES[scheme]
    profile = scenario.parent / yaml.safe_load(scenario.read_text())["model"]
    sources = [Path(store_dir) / "index.json", scenario, profile, head]
    if path.is_file() and all(path.stat().st_mtime > p.stat().st_mtime for p in sources):
        sc = load_scenario(path)
        log(f"# {bandwidth_mb_s:g} MB/s: reusing {_rel(out)} (calibrated {_when(path)}); "
            f"{describe_compute(sc.device)}; default target {sc.target_latency_ms:g} ms")
        return sc, sc.target_latency_ms
    base = load_scenario(SCHEMES[scheme][1])
    # A benchmark measures how well a device predicts, so it keeps one that calibrate alone
    # would refuse (its out-of-sample errors are logged below and in the file's header).
    cal = calibrate(store, base, bandwidth_mb_s=bandwidth_mb_s, latency_us=DEFAULT_LATENCY_US,
                    queries=queries, max_error_pct=1000.0)
    _, scen_path, target = write_calibration(out, base, cal, None)
    _log_calibration(log, bandwidth_mb_s, out, cal, f"; default target {target:g} ms")
    return load_scenario(scen_path), target


def _log_calibration(log, bandwidth_mb_s: float, out: Path, cal, extra: str = "") -> None:
    """What a benchmark says of a calibration it made: the device, its out-of-sample
    stage errors, the machine's noise and the fit's report."""
    from runtime.calibrate import describe_compute, fit_report

    log(f"# {bandwidth_mb_s:g} MB/s: calibrated into {_rel(out)}: {describe_compute(cal.device)}"
        f"{extra}; out-of-sample stage |error| median / p95: "
        + ", ".join(f"{k} {m:.1f} / {p:.1f} %" for k, (m, p) in cal.stage_errors.items())
        + f"; run-to-run noise {cal.facts['noise_pct']:.1f} %")
    for line in fit_report(cal).splitlines():
        log(f"#   {line.strip()}")


SMOLLM2_PHONE = ROOT / "problems" / "scenarios" / "smollm2-phone.yaml"


def calibrated_decoder_scenario(bandwidth_mb_s: float, *, store, base=SMOLLM2_PHONE,
                                plans: int = 16, budget_s: float = 60.0, log=print,
                                warm_reads: bool = False):
    """A decoder's question (default SmolLM2 on the phone) on this machine with storage
    emulated at `bandwidth_mb_s`: calibrated once (runtime/decode_calibrate.py, as
    `elasticplan calibrate --scenario` does; a few minutes) into
    build/bench/calibrated-<model>-X (-X-warm with `warm_reads`: the page cache read at the
    device's pace) and reused while the store's index, the scenario and its profile are
    older than it. Returns the calibrated scenario."""
    import torch
    import yaml

    from elasticplan.problem.loader import load_scenario
    from runtime.calibrate import DEFAULT_LATENCY_US, describe_compute, write_calibration
    from runtime.decode_calibrate import calibrate_decoder

    # one torch thread, as every benchmark measures (start()): a calibration made at
    # torch's default (2 here) prices compute that competes with the IO thread for the
    # second core, and its terms do not hold for the runs
    torch.set_num_threads(1)
    base = Path(base)
    out = CALIBRATED / f"calibrated-{base.stem}-{bandwidth_mb_s:g}{'-warm' if warm_reads else ''}"
    path = out / "scenario.yaml"
    profile = base.parent / yaml.safe_load(base.read_text())["model"]
    sources = [Path(store.path) / "index.json", base, profile]
    if path.is_file() and all(path.stat().st_mtime > p.stat().st_mtime for p in sources):
        sc = load_scenario(path)
        log(f"# {bandwidth_mb_s:g} MB/s: reusing {_rel(out)} (calibrated {_when(path)}); "
            f"{describe_compute(sc.device)}")
        return sc
    scenario = load_scenario(base)
    # kept even where calibrate alone would refuse it: the benchmark measures how well it
    # predicts (its out-of-sample errors are logged below and in the file's header)
    cal = calibrate_decoder(store, scenario, bandwidth_mb_s=bandwidth_mb_s,
                            latency_us=DEFAULT_LATENCY_US, plans=plans, repeats=3,
                            budget_s=budget_s, max_error_pct=1000.0, warm_reads=warm_reads,
                            log=log)
    _, scen_path, _ = write_calibration(out, scenario, cal, None)
    _log_calibration(log, bandwidth_mb_s, out, cal)
    return load_scenario(scen_path)


def _when(path: Path) -> str:
    return datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)

"""The process's own peak memory while it runs a plan, measured in a fresh process.

    python -m runtime.measurement.memprobe PLAN --store DIR [--scenario S] [--repeat N] [--threads T]

Prints one JSON object: `baseline_bytes` (VmRSS before the plan's executor exists),
`peak_bytes` (VmHWM after its queries) and `peak_above_baseline_bytes`, their difference:
what running the plan costs the process. Method, in order: imports; the store's
tokenizer and the test queries; one throwaway run of the same plan (so torch's kernels,
thread pools and code pages are in memory before the baseline, as in any warm process);
garbage collection and malloc_trim (freed memory goes back to the system); the baseline
from /proc/self/status VmRSS; the peak reset ("5" to /proc/self/clear_refs, Linux); then
the executor is built, the preload filled and the queries run; VmHWM is read last.

The process is set up as a memory-tight deployment would be (measured: docs/runtime.md,
"Kernel limits"). glibc's mmap threshold is fixed at 128 KiB (mallopt M_MMAP_THRESHOLD):
left dynamic, glibc raises it to the largest block freed (the throwaway run's IO ring,
~5 MB), after which every temporary below that comes from the heap, and the heap pages
those temporaries touched stay resident (+0.2-0.7 MB over a 9.6 MB plan). The executor
reads lean (`Executor(page_cache=False)`: no read-ahead, no hints, each read's pages
dropped once it completes), so the page cache it is charged for in a memory cgroup is the
read in flight, not what read-ahead, hints and finished reads left there.

`--handshake` (runtime/cgroups.py, `run --memory-cap`): the probe dies with its parent,
drops the store's pages from the page cache before the baseline (so the cgroup it runs in
holds none of them), prints the baseline as a first JSON line and waits for a line `go`
on stdin (the parent caps the cgroup meanwhile) before it runs the measured queries; any
other line or end of input ends it there.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys

import torch

from elasticplan.plans.plan import Plan
from elasticplan.plans.verify import scenario_for
from runtime.executor import Executor
from runtime.iodev import evict
from runtime.measurement.measure import query_batches
from runtime.store import ShardStore


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def trim() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere,
    nothing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's default, held fixed


def fix_mmap_threshold() -> bool:
    """Hold glibc's mmap threshold at its default (blocks from 128 KiB are mmapped, and
    unmapped when freed), instead of letting it rise to the largest block freed; False
    where this is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def release() -> None:
    gc.collect()
    trim()


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def drop_store_cache(store: ShardStore) -> None:
    """Drop the store's files from the page cache (clean pages: shards are fsync'ed)."""
    for path in store.path.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                evict(fd)
            finally:
                os.close(fd)


def run_plan(plan, scenario, store, queries) -> None:
    with Executor(plan, scenario, store, page_cache=False) as ex:
        ex.fill_preload()
        for q in queries:
            ex.run(q)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.measurement.memprobe")
    p.add_argument("plan")
    p.add_argument("--store", required=True)
    p.add_argument("--scenario")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--handshake", action="store_true",
                   help="print the baseline, wait for `go` on stdin before the measured queries")
    a = p.parse_args(argv)
    if a.handshake:
        die_with_parent()
    fix_mmap_threshold()
    torch.set_num_threads(a.threads)
    plan = Plan.load(a.plan)
    scenario = scenario_for(plan, a.scenario)
    store = ShardStore(a.store)
    queries = query_batches(store, scenario.model.seq_len, a.repeat)
    run_plan(plan, scenario, store, queries[:1])  # warm: kernels, pools, code pages
    release()
    if a.handshake:
        drop_store_cache(store)
    baseline = status_bytes("VmRSS")
    if a.handshake:  # the parent caps this process's cgroup now
        print(json.dumps({"baseline_bytes": baseline}), flush=True)
        if sys.stdin.readline().strip() != "go":
            return 0
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run_plan(plan, scenario, store, queries)
    peak = status_bytes("VmHWM")
    json.dump({"baseline_bytes": baseline, "peak_bytes": peak,
               "peak_above_baseline_bytes": peak - baseline}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

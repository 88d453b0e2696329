"""Limits the kernel enforces: a memory cgroup that caps a plan's process (`run
--memory-cap`) and a block-IO cgroup that throttles its reads (`run --throttle`, `calibrate
--throttle`), on cgroup v1 or v2, whichever this machine mounts the controller on.

Where. Our cgroups are made inside the cgroup this process already belongs to in that
hierarchy (/proc/self/cgroup, mapped through /proc/self/mountinfo), so whatever limits
the machine puts on this process still hold, and nothing outside our own cgroups is
changed: on v2 the controller must already be enabled for that cgroup's children
(its `cgroup.subtree_control`, a delegated cgroup); we never enable it. `ELASTICPLAN_CGROUP_ROOT=DIR`
replaces the machine's mounts by DIR (DIR/memory and DIR/blkio as v1, or DIR as v2), for
tests and for a cgroup tree mounted elsewhere.

Names. Each cgroup is `elasticplan-PID-START-PURPOSE[N]`: the pid and start time (clock
ticks since boot, /proc/PID/stat) of the run that made it. Every run first removes the
cgroups of runs that are gone (no such pid, or a pid with another start time): it kills
what is left inside them (the capped probe of a run that was SIGKILLed) and removes them.
A run removes its own cgroups when it ends, on an error, Ctrl-C or SIGTERM (handled as
Ctrl-C by the CLI) included.

Memory cap. The capped process is `runtime.measurement.memprobe --handshake`, born inside
the cgroup: it imports, loads the queries, runs the plan once (warm), frees, drops the
store's pages from the page cache and reports its baseline; the cap is then set to the
cgroup's charge at that moment (interpreter, torch, imports, code pages: its own baseline,
measured) plus the allowance (the plan's predicted peak, or the MB given) plus a margin, with
swap off for it, the cgroup's peak is reset, and the probe runs the measured queries.
The kernel kills it if it goes over (MemoryCapExceeded, exit 12).

Throttle. The run's own process is moved into a block-IO cgroup limited, on the block
device that holds the store, to the device's bandwidth (read bytes/s) and to one read per
latency (read IOs/s); it is moved back to the cgroup it came from when the run ends.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from elasticplan.costmodel import Steps
from elasticplan.errors import CgroupUnavailable, MemoryCapExceeded

PREFIX = "elasticplan-"
ROOT_ENV = "ELASTICPLAN_CGROUP_ROOT"
DEFAULT_MARGIN = 0.05  # of the allowance: --cap-margin's default
_NAME = re.compile(r"^elasticplan-(\d+)-(\d+)-([a-z]+)(\d*)$")

# kind -> (its controller's name on v1, on v2), and the control file only a cgroup of it has
CONTROLLERS = {"memory": ("memory", "memory"), "io": ("blkio", "io")}
CONTROL_FILE = {(1, "memory"): "memory.limit_in_bytes", (2, "memory"): "memory.max",
                (1, "io"): "blkio.throttle.read_bps_device", (2, "io"): "io.max"}


# --- finding the hierarchy -------------------------------------------------------------

@dataclass(frozen=True)
class Hierarchy:
    """Where our cgroups of one kind ("memory" or "io") go: `parent`, this process's own
    cgroup in the hierarchy that has the controller, cgroup v`version`."""

    kind: str
    version: int
    parent: Path
    root: str | None = None  # the directory that stood in for the mounts, if one did

    @property
    def controller(self) -> str:
        return CONTROLLERS[self.kind][self.version - 1]

    @property
    def describe(self) -> str:
        return f"cgroup v{self.version} {self.controller}"


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[tuple[str, str, str, str, str]]:
    """(root within its filesystem, mount point, type, source, super options) per mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            a, b = pre.split(), post.split()
            if len(a) >= 5 and len(b) >= 2:
                out.append((_unescape(a[3]), _unescape(a[4]), b[0], _unescape(b[1]),
                            b[2] if len(b) > 2 else ""))
    return out


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per v1 controller, and "" -> its v2 cgroup."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in (ctrls.split(",") if ctrls else [""]):
                out[c] = path
    return out


def _inside(mount_point: str, mount_root: str, own: str) -> Path | None:
    rel = os.path.relpath(own, mount_root)
    if rel.startswith(".."):
        return None  # our cgroup is not visible under this mount
    return Path(mount_point) / rel if rel != "." else Path(mount_point)


def hierarchy(kind: str, root: str | os.PathLike | None = None) -> Hierarchy:
    """Where this process's cgroups of `kind` go; CgroupUnavailable naming what is missing.
    `root` (or $ELASTICPLAN_CGROUP_ROOT): a directory standing for the cgroup mounts."""
    v1, v2 = CONTROLLERS[kind]
    root = root if root is not None else os.environ.get(ROOT_ENV) or None
    if root is not None:
        r = Path(root)
        if (r / v1).is_dir():
            return Hierarchy(kind, 1, r / v1, str(root))
        if v2 in _words(r / "cgroup.controllers"):
            return _delegated(Hierarchy(kind, 2, r, str(root)))
        raise CgroupUnavailable(f"{r}: no {kind} controller: neither {r / v1} (cgroup v1) nor "
                                f"{r / 'cgroup.controllers'} listing {v2!r} (cgroup v2)")
    own = _own_cgroups()
    table = mounts()
    for mroot, point, fstype, _, opts in table:
        if fstype == "cgroup" and v1 in opts.split(",") and v1 in own:
            parent = _inside(point, mroot, own[v1])
            if parent is not None:
                return Hierarchy(kind, 1, parent)
    for mroot, point, fstype, _, _ in table:
        if fstype == "cgroup2" and "" in own and v2 in _words(Path(point) / "cgroup.controllers"):
            parent = _inside(point, mroot, own[""])
            if parent is not None:
                return _delegated(Hierarchy(kind, 2, parent))
    raise CgroupUnavailable(f"no {kind} controller: neither a cgroup v1 {v1!r} hierarchy nor a "
                            f"cgroup v2 mount offering {v2!r} is mounted (/proc/self/mountinfo)")


def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _delegated(h: Hierarchy) -> Hierarchy:
    """On v2 a child gets the controller only if its parent enables it for its children; we
    never enable it ourselves (that would change the machine's own cgroup)."""
    if h.controller not in _words(h.parent / "cgroup.subtree_control"):
        raise CgroupUnavailable(f"{h.parent / 'cgroup.subtree_control'}: cgroup v2 {h.controller} "
                                f"is not enabled for this process's cgroup's children (run "
                                f"inside a delegated cgroup, e.g. `systemd-run --scope -p "
                                f"Delegate=yes`)")
    return h


# --- our cgroups: names, stale ones, creation and removal -------------------------------

def start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _owner_alive(name: str) -> bool:
    m = _NAME.match(name)
    if m is None:
        return True  # not ours by name: never touched
    return start_time(int(m.group(1))) == int(m.group(2))


class Cgroup:
    """One of our cgroups (a directory under the hierarchy's parent)."""

    def __init__(self, h: Hierarchy, path: Path):
        self.h, self.path = h, path

    def __repr__(self) -> str:
        return f"Cgroup({self.path})"

    @classmethod
    def create(cls, h: Hierarchy, purpose: str) -> "Cgroup":
        """Remove stale cgroups of ours first (of every kind), then make a new one;
        CgroupUnavailable if the hierarchy cannot be written or is not a cgroup filesystem."""
        sweep(h)
        me = os.getpid()
        stem = f"{PREFIX}{me}-{start_time(me)}-{purpose}"
        for n in range(1000):
            path = h.parent / (stem + (str(n) if n else ""))
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise CgroupUnavailable(_unwritable(h, e)) from None
            break
        else:
            raise CgroupUnavailable(f"{h.parent}: 1000 cgroups named {stem}N already")
        control = CONTROL_FILE[(h.version, h.kind)]
        if not (path / control).exists():
            try:
                path.rmdir()
            except OSError:
                pass
            raise CgroupUnavailable(f"{h.parent}: not a {h.describe} hierarchy (a directory made "
                                    f"there has no {control}; cgroupfs makes it)")
        return cls(h, path)

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def write(self, name: str, value: str) -> None:
        try:
            with open(self.path / name, "w") as f:
                f.write(value)
        except OSError as e:
            raise CgroupUnavailable(f"{self.path / name}: cannot write {value.strip()!r} "
                                    f"({e.strerror})") from None

    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    def pids(self) -> list[int]:
        return _pids(self.path)

    def add(self, pid: int) -> None:
        self.write("cgroup.procs", str(pid))

    def remove(self) -> None:
        remove(self.path)


def _unwritable(h: Hierarchy, e: OSError) -> str:
    why = {errno.EROFS: "the cgroup mount is read-only",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.ENOENT: "no such directory"}.get(e.errno, e.strerror)
    who = "" if os.geteuid() == 0 else f" (euid {os.geteuid()}, not root)"
    return f"{h.parent}: cannot create a {h.describe} cgroup: {why}{who}"


def _pids(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def remove(path: Path, wait_s: float = 5.0) -> None:
    """Kill what is left in one of our cgroups and remove it (no error if it is gone)."""
    deadline = time.monotonic() + wait_s
    while True:
        for pid in _pids(path):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def ours(h: Hierarchy) -> list[Path]:
    """Our cgroups (by name) under the hierarchy's parent, live runs' included."""
    try:
        return sorted(p for p in h.parent.iterdir() if _NAME.match(p.name) and p.is_dir())
    except OSError:
        return []


def sweep(h: Hierarchy) -> None:
    """Remove the stale cgroups of ours in `h` and in the other kind's hierarchy beside it
    (where this process can find one): a run killed while it throttled leaves a block-IO
    cgroup, which the next run that caps memory removes, and the other way round."""
    remove_stale(h)
    other = next(k for k in CONTROLLERS if k != h.kind)
    try:
        o = hierarchy(other, h.root)
    except CgroupUnavailable:
        return
    if o.parent != h.parent:
        remove_stale(o)


def remove_stale(h: Hierarchy, log=lambda s: print(s, file=sys.stderr)) -> list[Path]:
    """Remove the cgroups of our runs that are gone; returns them."""
    gone = [p for p in ours(h) if not _owner_alive(p.name)]
    for p in gone:
        try:
            remove(p)
            log(f"elasticplan: removed {p}, left by run {p.name.split('-')[1]} that ended "
                f"without removing it")
        except OSError as e:
            log(f"elasticplan: warning: could not remove the stale cgroup {p}: {e.strerror}")
    return gone


# --- memory cap -------------------------------------------------------------------------

def _stat(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


class MemoryCgroup(Cgroup):
    """A memory cgroup, v1 or v2: its charge, cap (swap off), peak, page cache, OOM kills."""

    _peak_fd: int | None = None

    def usage(self) -> int:
        return int(self.read("memory.usage_in_bytes" if self.h.version == 1
                             else "memory.current"))

    def set_cap(self, nbytes: int) -> str:
        """Cap the charge at nbytes, swap off for this cgroup; says how swap was turned off."""
        if self.h.version == 1:
            self.write("memory.limit_in_bytes", str(nbytes))
            self.write("memory.swappiness", "0")
            if self.has("memory.memsw.limit_in_bytes"):  # memory + swap = memory: no swap
                self.write("memory.memsw.limit_in_bytes", str(nbytes))
                return "memory.swappiness 0, memory.memsw.limit_in_bytes = the cap"
            return "memory.swappiness 0 (no swap accounting in this kernel)"
        self.write("memory.max", str(nbytes))
        if self.has("memory.swap.max"):
            self.write("memory.swap.max", "0")
            return "memory.swap.max 0"
        return "no swap controller (this kernel has no swap for cgroups)"

    def reset_peak(self) -> bool:
        """Start the peak from now; False if this kernel cannot (v2 before Linux 6.12)."""
        if self.h.version == 1:
            self.write("memory.max_usage_in_bytes", "0")
            return True
        try:
            self._peak_fd = os.open(self.path / "memory.peak", os.O_RDWR)
            os.write(self._peak_fd, b"reset\n")  # per open file: read back through this fd
            return True
        except OSError:
            self.close()
            return False

    def peak(self) -> int | None:
        if self.h.version == 1:
            return int(self.read("memory.max_usage_in_bytes"))
        if self._peak_fd is None:
            return None
        return int(os.pread(self._peak_fd, 64, 0).decode().split()[0])

    def page_cache(self) -> int:
        s = _stat(self.read("memory.stat"))
        if self.h.version == 1:
            return s.get("total_cache", s.get("cache", 0))
        return s.get("file", 0)

    def composition(self) -> tuple[int, int, int]:
        """(charge, anonymous, page cache) now, from one read of each file."""
        s = _stat(self.read("memory.stat"))
        if self.h.version == 1:
            anon, cache = s.get("total_rss", s.get("rss", 0)), s.get("total_cache",
                                                                     s.get("cache", 0))
        else:
            anon, cache = s.get("anon", 0), s.get("file", 0)
        return self.usage(), anon, cache

    def oom_kills(self) -> int:
        if self.h.version == 1:
            return _stat(self.read("memory.oom_control")).get("oom_kill", 0)
        return _stat(self.read("memory.events")).get("oom_kill", 0)

    def close(self) -> None:
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None

    def remove(self) -> None:
        self.close()
        super().remove()


@dataclass(frozen=True)
class CapReport:
    """A capped run of the plan's process, in bytes. `baseline_bytes` is the cgroup's
    charge after start-up (what the cap is built on), `peak_bytes` its most during the
    measured queries (None where the kernel cannot reset a v2 peak), page cache included;
    `process_*` are memprobe's own figures (VmRSS baseline, VmHWM above it)."""

    cgroup: str
    version: int
    cap_bytes: int
    baseline_bytes: int
    allowance_bytes: int
    allowance: str  # where the allowance comes from
    margin: float  # of the allowance
    predicted_peak_bytes: int  # the plan's
    swap: str
    queries: int
    peak_bytes: int | None
    page_cache_baseline_bytes: int
    page_cache_end_bytes: int
    process_baseline_bytes: int
    process_peak_above_baseline_bytes: int
    # sampled while the queries ran (every 2 ms): the highest charge seen and what it was
    # made of, and the most anonymous memory seen (bytes above zero, not above the baseline)
    sampled_peak_bytes: int = 0
    sampled_anon_bytes: int = 0
    sampled_page_cache_bytes: int = 0
    sampled_anon_max_bytes: int = 0
    samples: int = 0
    anon_baseline_bytes: int = 0

    @property
    def peak_above_baseline_bytes(self) -> int | None:
        return None if self.peak_bytes is None else self.peak_bytes - self.baseline_bytes

    @property
    def anon_above_baseline_bytes(self) -> int:
        return self.sampled_anon_max_bytes - self.anon_baseline_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_above_baseline_bytes": self.peak_above_baseline_bytes,
                "anon_above_baseline_bytes": self.anon_above_baseline_bytes}

    def format(self, executor_peak_bytes: int | None = None) -> str:
        mb = lambda b: f"{b / 1e6:.3f}"  # noqa: E731
        peak = "not measured (cgroup v2 before Linux 6.12 cannot reset memory.peak)" \
            if self.peak_bytes is None else f"{mb(self.peak_above_baseline_bytes)} MB"
        executor = "" if executor_peak_bytes is None else f"; executor {mb(executor_peak_bytes)} MB"
        return (f"memory cap (cgroup v{self.version}, {self.cgroup}): {self.queries} queries "
                f"completed under a cap of {mb(self.cap_bytes)} MB = baseline "
                f"{mb(self.baseline_bytes)} MB after start-up + {self.allowance} "
                f"{mb(self.allowance_bytes)} MB + margin {self.margin * 100:g}%; swap off "
                f"({self.swap})\n"
                f"  above the baseline: cgroup peak {peak} (page cache "
                f"{mb(self.sampled_page_cache_bytes)} MB of it at the highest of {self.samples} "
                f"samples; anonymous at most {mb(self.anon_above_baseline_bytes)} MB)"
                f"{executor}; process VmHWM {mb(self.process_peak_above_baseline_bytes)} MB; "
                f"predicted {mb(self.predicted_peak_bytes)} MB")


class _Sampler:
    """The cgroup's charge and what it is made of, read every `every_s` on a thread while
    the capped queries run: the sample with the highest charge (charge, anonymous, page
    cache) and the most anonymous memory seen. The kernel's own peak is exact; these say
    what it was made of, to within what happens between two samples."""

    def __init__(self, cg: MemoryCgroup, every_s: float = 0.002):
        import threading

        self.cg, self.every_s = cg, every_s
        self.top, self.anon_max, self.n = (0, 0, 0), 0, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="elasticplan-cgroup-sampler",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(self.every_s):
            try:
                c = self.cg.composition()
            except (OSError, ValueError):
                return
            self.n += 1
            if c[0] > self.top[0]:
                self.top = c
            self.anon_max = max(self.anon_max, c[1])

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def run_capped(argv: list[str], *, allowance_bytes: int, allowance: str,
               predicted_peak_bytes: int, margin: float = DEFAULT_MARGIN, queries: int,
               root: str | None = None) -> tuple[CapReport, dict]:
    """Run the probe `argv` (runtime.measurement.memprobe ... --handshake) in a new memory
    cgroup, cap it after its start-up, let it run its queries; (the report, the probe's own
    JSON). MemoryCapExceeded if the kernel kills it; the cgroup is removed in every case."""
    h = hierarchy("memory", root)
    cg = MemoryCgroup.create(h, "mem")
    proc = None
    try:
        with tempfile.TemporaryFile("w+") as err:
            # born inside the cgroup: the shell joins it, then becomes the probe
            proc = subprocess.Popen(["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"',
                                     str(cg.path / "cgroup.procs"), *argv],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    text=True)
            first = proc.stdout.readline()
            if not first:
                proc.wait()
                raise RuntimeError(f"the capped memprobe ended before its baseline (exit "
                                   f"{proc.returncode}): {_tail(err)}")
            process_baseline = int(json.loads(first)["baseline_bytes"])
            baseline, anon0, cache0 = cg.composition()
            cap = baseline + int(round(allowance_bytes * (1 + margin)))
            swap = cg.set_cap(cap)
            cg.reset_peak()
            kills = cg.oom_kills()
            sampler = _Sampler(cg)
            try:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            except BrokenPipeError:  # it ended meanwhile: its exit status says how
                pass
            try:
                out, _ = proc.communicate()
            finally:
                sampler.stop()
            killed = cg.oom_kills() - kills
            peak, cache1 = cg.peak(), cg.page_cache()
            if proc.returncode != 0:
                if killed or (proc.returncode == -signal.SIGKILL and peak is not None
                               and peak >= cap):
                    mb = lambda b: f"{b / 1e6:.3f}"  # noqa: E731
                    exc = MemoryCapExceeded(
                        f"killed by the kernel: the plan's process exceeded its memory cap of "
                        f"{mb(cap)} MB ({h.describe} {cg.path.name}) = its baseline "
                        f"{mb(baseline)} MB after start-up + {allowance} "
                        f"{mb(allowance_bytes)} MB + margin {margin * 100:g}%; the plan's "
                        f"predicted peak is {mb(predicted_peak_bytes)} MB (page cache in the "
                        f"cgroup at the end {mb(cache1)} MB)")
                    exc.cap_bytes, exc.baseline_bytes = cap, baseline  # for benchmarks
                    raise exc
                raise RuntimeError(f"the capped memprobe failed (exit {proc.returncode}): "
                                   f"{_tail(err)}")
            result = json.loads(out.strip().splitlines()[-1])
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()
                except OSError:  # a broken pipe's unflushed line
                    pass
        cg.remove()
    return CapReport(
        cgroup=str(cg.path), version=h.version, cap_bytes=cap, baseline_bytes=baseline,
        allowance_bytes=allowance_bytes, allowance=allowance, margin=margin,
        predicted_peak_bytes=predicted_peak_bytes, swap=swap, queries=queries, peak_bytes=peak,
        page_cache_baseline_bytes=cache0, page_cache_end_bytes=cache1,
        sampled_peak_bytes=sampler.top[0], sampled_anon_bytes=sampler.top[1],
        sampled_page_cache_bytes=sampler.top[2], sampled_anon_max_bytes=sampler.anon_max,
        samples=sampler.n, anon_baseline_bytes=anon0,
        process_baseline_bytes=process_baseline,
        process_peak_above_baseline_bytes=int(result["peak_above_baseline_bytes"])), result


def capped_probe(plan, scenario, store, *, repeats: int, threads: int,
                 allowance_mb: float | None = None, margin: float = DEFAULT_MARGIN,
                 scenario_path: str | None = None, root: str | None = None) -> CapReport:
    """The plan's queries (`repeats`) in runtime.measurement.memprobe, in a memory cgroup
    capped at the probe's baseline after start-up + the allowance (the plan's predicted
    peak; `allowance_mb` instead if given) + `margin` of it (run_capped)."""
    from elasticplan.costmodel import simulate
    from runtime.measurement.measure import memprobe_argv

    predicted = simulate(scenario, plan.selection(scenario), plan.execution,
                         plan.layout).memory.peak_bytes
    if allowance_mb is None:
        allowance, what = predicted, "the plan's predicted peak"
    else:
        allowance, what = int(round(allowance_mb * 1e6)), "the allowance"
    with tempfile.TemporaryDirectory(prefix="elasticplan-capped-") as tmp:
        path = os.path.join(tmp, "plan.json")
        plan.save(path)
        argv = memprobe_argv(plan, path, store, repeats, threads) + ["--handshake"]
        if scenario_path is not None:
            argv[argv.index("--scenario") + 1] = os.path.abspath(scenario_path)
        report, _ = run_capped(argv, allowance_bytes=allowance, allowance=what,
                               predicted_peak_bytes=predicted, margin=margin, queries=repeats,
                               root=root)
    return report


def _tail(f) -> str:
    f.seek(0)
    return f.read().strip()[-2000:] or "(no output)"


# --- block-IO throttle ------------------------------------------------------------------

def block_device(path: str | os.PathLike) -> tuple[str, str]:
    """("MAJOR:MINOR", name) of the whole disk that holds `path` (a partition's disk: the
    throttle takes whole disks); CgroupUnavailable if it is on no block device."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    sysdir = Path("/sys/dev/block") / dev
    if not sysdir.exists():  # btrfs, overlayfs...: an anonymous device; try the mount's source
        best = max(((p, s, t) for _, p, t, s, _ in mounts()
                    if str(Path(path).resolve()).startswith(p.rstrip("/") + "/") or
                    Path(path).resolve() == Path(p)), key=lambda m: len(m[0]), default=None)
        source = best[1] if best else "?"
        try:
            sb = os.stat(source)
            if not (sb.st_mode & 0o170000) == 0o060000:
                raise OSError
            dev = f"{os.major(sb.st_rdev)}:{os.minor(sb.st_rdev)}"
            sysdir = Path("/sys/dev/block") / dev
        except OSError:
            raise CgroupUnavailable(
                f"{path}: on device {dev}, not a block device (a {best[2] if best else '?'} "
                f"mount of {source}): no disk to throttle") from None
    real = sysdir.resolve()
    if (real / "partition").exists():
        real = real.parent
        dev = (real / "dev").read_text().strip()
    return dev, real.name


@dataclass(frozen=True)
class IoCounters:
    """What the cgroup's own counters say was read from the device: bytes and IOs."""

    bytes: int
    ios: int

    def __sub__(self, other: "IoCounters") -> "IoCounters":
        return IoCounters(self.bytes - other.bytes, self.ios - other.ios)


def parse_v1_counter(text: str, dev: str) -> int:
    """blkio.throttle.io_service_bytes / io_serviced: the device's `Read` line."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == dev and parts[1] == "Read":
            return int(parts[2])
    return 0


def parse_io_stat(text: str, dev: str) -> IoCounters:
    """v2 io.stat: `MAJ:MIN rbytes=N wbytes=N rios=N wios=N ...`."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == dev:
            kv = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
            return IoCounters(int(kv.get("rbytes", 0)), int(kv.get("rios", 0)))
    return IoCounters(0, 0)


def io_max_line(dev: str, bps: int, iops: int | None) -> str:
    """v2 io.max: read limits only (writes stay unlimited)."""
    return f"{dev} rbps={bps} riops={'max' if iops is None else iops}"


def iops_for(latency_us: float) -> int | None:
    """One read per `latency_us` as a read-IOPS limit (None: no latency, no limit)."""
    return max(1, round(1e6 / latency_us)) if latency_us > 0 else None


# Between two measured runs under the throttle: long enough that every query starts a
# fresh slice, as one after an idle spell does, and as the replay's Steps assume. Each read
# the throttle passes extends its slice to 100 ms after it, rounded up to a whole slice
# (so up to 200 ms); a read inside that slice shares its allowance. Measured: at 120 ms
# apart the 11.7 MB plan at 20 MB/s read 4 MB at once and its steps came ~45 ms early;
# back to back the 11 MB list waited for a step every second time (10.7, 95.2, 11.0,
# 87.9 ms; docs/results.md, "The throttle on a disk that keeps up").
THROTTLE_GAP_S = 0.25


def throttled_prediction(device) -> str:
    """How `run --throttle` predicts a plan on `device` (measure_plans(..., throttled=True))."""
    if device.disk is not None:
        return (f"predicted as the throttle runs it: the disk beneath it at "
                f"{device.disk.bandwidth_mb_s:g} MB/s + {device.disk.latency_us:g} us per read "
                f"(the device's storage.disk, from `calibrate --throttle`), each layer's reads "
                f"held to the throttle's {Steps.slice_ms:g} ms steps, a streamed table's rows "
                f"from the page cache; each measured query {1e3 * THROTTLE_GAP_S:g} ms after "
                f"the one before, so that it starts a fresh slice")
    return ("predicted at the throttle's settings as a linear rate (the plan's own figures): "
            "the device gives no disk beneath the throttle (storage.disk; `calibrate "
            "--throttle` measures it), and a slice admits bandwidth x 100 ms at the disk's own "
            "speed, so reads that fit in it run faster than predicted")


class IoThrottle:
    """This process's reads of the store's disk, throttled by the kernel to a device's
    bandwidth and (as reads/s) its per-read latency, inside `with`. `counters()` are the
    cgroup's own (read bytes and IOs on that disk)."""

    def __init__(self, store_path: str | os.PathLike, bandwidth_mb_s: float,
                 latency_us: float, root: str | None = None):
        self.dev, self.disk = block_device(store_path)
        self.bps = int(round(bandwidth_mb_s * 1e6))
        self.iops = iops_for(latency_us)
        self.h = hierarchy("io", root)  # refused here, before any measuring
        self.cg: Cgroup | None = None

    def __enter__(self) -> "IoThrottle":
        self.cg = Cgroup.create(self.h, "io")
        try:
            if self.h.version == 1:
                self.cg.write("blkio.throttle.read_bps_device", f"{self.dev} {self.bps}")
                if self.iops is not None:
                    self.cg.write("blkio.throttle.read_iops_device", f"{self.dev} {self.iops}")
            else:
                self.cg.write("io.max", io_max_line(self.dev, self.bps, self.iops))
            self.cg.add(os.getpid())
        except BaseException:
            self.cg.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            with open(self.h.parent / "cgroup.procs", "w") as f:  # back where it came from
                f.write(str(os.getpid()))
        finally:
            self.cg.remove()

    def settings(self) -> tuple[int, int | None]:
        """(read bytes/s, read IOs/s) as the kernel holds them for the disk (None: no limit)."""
        if self.h.version == 1:
            bps = parse_v1_counter_limit(self.cg.read("blkio.throttle.read_bps_device"), self.dev)
            iops = parse_v1_counter_limit(self.cg.read("blkio.throttle.read_iops_device"),
                                          self.dev)
            return bps or 0, iops
        for line in self.cg.read("io.max").splitlines():
            parts = line.split()
            if parts and parts[0] == self.dev:
                kv = dict(p.split("=", 1) for p in parts[1:])
                iops = kv.get("riops", "max")
                return int(kv.get("rbps", 0)), None if iops == "max" else int(iops)
        return 0, None

    def counters(self) -> IoCounters:
        if self.h.version == 1:
            return IoCounters(
                parse_v1_counter(self.cg.read("blkio.throttle.io_service_bytes"), self.dev),
                parse_v1_counter(self.cg.read("blkio.throttle.io_serviced"), self.dev))
        return parse_io_stat(self.cg.read("io.stat"), self.dev)

    def describe(self) -> str:
        iops = "no IOPS limit" if self.iops is None else f"{self.iops} reads/s"
        return (f"kernel-throttled: {self.h.describe} {self.cg.path.name} on {self.disk} "
                f"({self.dev}), {self.bps / 1e6:g} MB/s and {iops}, real cold reads, no "
                f"device clock")


def parse_v1_counter_limit(text: str, dev: str) -> int | None:
    """blkio.throttle.read_*_device: `MAJ:MIN VALUE` lines; None if the disk has none."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == dev:
            return int(parts[1])
    return None


def planned_disk(plan, scenario, store) -> tuple[int, int, int]:
    """What one run of the plan reads from the disk when its streamed shards' files are
    cold and read-ahead is off: (the plan's streamed shard bytes, its reads, the bytes of
    the whole pages those shards cover, each page once; a file's last page only up to its
    last block, which is all the kernel reads of it: measured on an ext4 of 1 KB blocks,
    where whole pages over-counted by 3-18 KB a run and this is exact). Preloaded shards
    are read before the query; embedding rows come from the page cache
    (docs/runtime.md)."""
    from runtime.executor import planned_variants

    page = os.sysconf("SC_PAGE_SIZE")
    spans: dict[str, set[int]] = {}
    nbytes = reads = 0
    for row in planned_variants(plan, scenario.model, store):
        for v, preloaded in row:
            if preloaded:
                continue
            nbytes, reads = nbytes + v.nbytes, reads + 1
            pages = spans.setdefault(v.file, set())
            pages.update(range(v.offset // page, -(-(v.offset + v.nbytes) // page)))
    return nbytes, reads, sum(covered_bytes(Path(store.path) / f, pages, page)
                              for f, pages in spans.items())


def covered_bytes(path: Path, pages: set[int], page: int) -> int:
    """The bytes a cold read of these pages of a file fetches from its disk: a whole page
    each, but the file's last page only up to the block its last byte is in (the file
    system's block size: a page holds several blocks on a file system of small blocks)."""
    size = path.stat().st_size
    last = (size - 1) // page
    block = os.statvfs(path).f_bsize
    tail = min(page, -(-size // block) * block - last * page)
    return page * len(pages - {last}) + (tail if last in pages else 0)


@dataclass(frozen=True)
class DiskCheck:
    """The throttle cgroup's own counters per measured run against the plan's reads."""

    planned_bytes: int
    planned_reads: int
    page_bytes: int  # the pages the plan's streamed shards cover (planned_disk)
    runs: tuple[IoCounters, ...]
    bps: int | None = None  # the throttle's bandwidth, bytes/s

    @property
    def equal(self) -> bool:
        return all(r.bytes == self.page_bytes for r in self.runs)

    @property
    def steps(self) -> Steps | None:
        """The throttle's staircase (elasticplan.costmodel.Steps: 100 ms slices, measured)."""
        return None if not self.bps else Steps(self.bps)

    @property
    def slice_bytes(self) -> int | None:
        """What the throttle admits at once, after a slice without reads."""
        return None if not self.bps else int(self.steps.allowance_bytes)

    @property
    def last_step_ms(self) -> float | None:
        """When, from a query's first read after a slice without reads, the throttle's
        staircase admits the query's last byte (0: all at once)."""
        return None if not self.bps else self.steps.waits(self.page_bytes) * self.steps.slice_ms

    def to_dict(self) -> dict:
        return {"planned_bytes": self.planned_bytes, "planned_reads": self.planned_reads,
                "page_bytes": self.page_bytes, "equal": self.equal,
                "runs": [{"bytes": r.bytes, "ios": r.ios} for r in self.runs],
                "slice_bytes": self.slice_bytes, "last_step_ms": self.last_step_ms}

    def staircase(self) -> str:
        """What the throttle's slices make of this plan's reads (docs/runtime.md)."""
        mb, at_once = self.page_bytes / 1e6, self.slice_bytes / 1e6
        if self.page_bytes <= self.slice_bytes:
            return (f"the throttle admits {at_once:g} MB at once after {self.steps.slice_ms:g} "
                    f"ms without reads: a query's {mb:.3f} MB go at the disk's own speed, "
                    f"not the device's {self.bps / 1e6:g} MB/s")
        return (f"the throttle admits {at_once:g} MB per {self.steps.slice_ms:g} ms slice, "
                f"in steps: a query's {mb:.3f} MB wait for the step at {self.last_step_ms:g} ms "
                f"(at {self.bps / 1e6:g} MB/s they take {1e3 * self.page_bytes / self.bps:.1f} ms)")

    def format(self) -> str:
        got = sorted({(r.bytes, r.ios) for r in self.runs})
        seen = "; ".join(f"{b:,} B in {n} IOs" for b, n in got)
        verdict = "equal, every run" if self.equal else \
            f"NOT equal in {sum(r.bytes != self.page_bytes for r in self.runs)} of " \
            f"{len(self.runs)} runs (pages the runs found cached, or embedding rows the page " \
            f"cache had dropped)"
        text = (f"disk, per measured run, by the cgroup's own counters: {seen}; the plan "
                f"streams {self.planned_bytes:,} B in {self.planned_reads} reads, "
                f"{self.page_bytes:,} B in the pages it covers: {verdict}")
        return text if not self.bps or not self.page_bytes else f"{text}\n{self.staircase()}"


def disk_check(plan, scenario, store, runs, bps: int | None = None) -> DiskCheck:
    planned, reads, pages = planned_disk(plan, scenario, store)
    return DiskCheck(planned, reads, pages, tuple(runs), bps)


def no_readahead(fds) -> None:
    """Turn read-ahead off on these open files (POSIX_FADV_RANDOM): under the throttle each
    read fetches its own pages from the disk and no more, as the device would."""
    for fd in fds:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)

"""Storage, as the runtime sees it: cold page cache, resident-page counts, and the emulated
device clock.

Cold reads. Shard files are fsync'ed when the store is built (runtime/store.py), so
`posix_fadvise(DONTNEED)` can evict their pages (it silently keeps dirty pages;
docs/runtime.md). `evict` does that per file, and `resident_pages` asks the kernel
(`mincore`) how many pages of a file range or a buffer are in memory, so a run can say
"0 of N pages were cached before it" instead of assuming it.

Emulation. A target device's storage is slower than this machine's disk. `DeviceClock`
spaces real reads at the device's speed with absolute deadlines: a read completes no
earlier than the previous completion + latency + bytes / bandwidth (the channel starts at
the query's arrival and the runtime issues reads back to back, ahead of the device), and never
before it really completed. Whoever needs the data sleeps once per batch of reads (a
layer), to the batch's last deadline: per-read sleeps overshoot by ~80 us each and a
busy-wait holds the GIL against the compute thread (both measured; docs/runtime.md). The
real reads run ahead of the deadlines, so a real latency spike (cold reads of ~200 KB
here take 0.3 ms, sometimes 1.5 ms) does not delay the device unless the real disk falls
behind it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time

from elasticplan.costmodel import read_ms
from elasticplan.problem.spec import Device

PAGE = mmap.PAGESIZE

_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t,
                                  ctypes.POINTER(ctypes.c_ubyte)]
    return _libc


def _mincore(addr: int, length: int) -> int:
    """Resident pages among those overlapping [addr, addr + length)."""
    start = addr - addr % PAGE
    n = -(-(addr + length - start) // PAGE)
    vec = (ctypes.c_ubyte * n)()
    if _lib().mincore(ctypes.c_void_p(start), n * PAGE, vec) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore: {os.strerror(err)}")
    return sum(v & 1 for v in vec)


def resident_pages(fd: int, offset: int = 0, length: int | None = None) -> tuple[int, int]:
    """(resident, total) pages of a file range in the page cache, measured with mincore."""
    size = os.fstat(fd).st_size
    length = size - offset if length is None else length
    if length <= 0:
        return 0, 0
    start = offset - offset % PAGE
    span = offset + length - start
    lib = _lib()
    addr = lib.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    try:
        return _mincore(addr, span), -(-span // PAGE)
    finally:
        lib.munmap(ctypes.c_void_p(addr), span)


def buffer_resident_bytes(buf) -> int:
    """Bytes of memory pages backing a writable buffer (numpy array, bytearray) that are
    resident, measured with mincore; whole pages, so up to a page more than its size at
    each end."""
    mv = memoryview(buf)
    if mv.nbytes == 0:
        return 0
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mv))
    return _mincore(addr, mv.nbytes) * PAGE


def evict(fd: int) -> None:
    """Drop a file's clean pages from the page cache (the next reads are cold)."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


class DeviceClock:
    """A device's storage channel, on perf_counter time: each read takes what the cost
    model's `read_ms` charges for it (latency_us + bytes / bandwidth_mb_s).

    `start(t)` opens the channel at time t; `complete(nbytes, finished, issued)` books the
    next read, issued at `issued` and really finished at `finished`, and returns when the
    emulated device would have finished it: it starts when the channel is free or when it
    was issued, whichever is later (a reader that waited, e.g. for the prefetch window,
    finds the channel idle). Deadlines are absolute, so sleep overshoot does not accumulate. None for
    the device: no emulation (a read completes when it really does)."""

    def __init__(self, device: Device | None):
        self.device = device
        self.busy_until = 0.0

    @property
    def emulated(self) -> bool:
        return self.device is not None

    def start(self, at: float) -> None:
        self.busy_until = at

    def read_seconds(self, nbytes: int) -> float:
        return read_ms(self.device, nbytes) / 1e3

    def complete(self, nbytes: int, finished: float, issued: float | None = None) -> float:
        if not self.emulated:
            self.busy_until = finished
        else:
            start = self.busy_until if issued is None else max(self.busy_until, issued)
            self.busy_until = max(finished, start + self.read_seconds(nbytes))
        return self.busy_until

    @staticmethod
    def sleep_until(deadline: float) -> float:
        """Sleep to an absolute perf_counter deadline; returns the time actually woken."""
        now = time.perf_counter()
        if deadline > now:
            time.sleep(deadline - now)
            now = time.perf_counter()
        return now

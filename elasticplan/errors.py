"""One root exception with specific subclasses.

Every error a user can cause derives from ElasticplanError and carries a
one-line message; the CLI prints that line and exits non-zero, never a
traceback. Anything else escaping the library is a bug.
"""

from __future__ import annotations


class ElasticplanError(Exception):
    """Root of every error elasticplan raises on purpose."""

    exit_code = 1


class InvalidArgument(ElasticplanError):
    """An argument (a command-line flag, or a keyword of a library call) is out of range or
    of the wrong kind; the message names it and what it accepts. Like argparse's own usage
    errors, it exits 2."""

    exit_code = 2


class SpecError(ElasticplanError):
    """A problem file is malformed: names the file, the key path and what is wrong."""

    exit_code = 2

    def __init__(self, file: str | None, key_path: str, message: str):
        self.file = file
        self.key_path = key_path
        self.message = message
        where = file or "<inline>"
        if key_path:
            where += f": {key_path}"
        super().__init__(f"{where}: {message}")


class InfeasibleError(ElasticplanError):
    """The solver proved that no plan exists; the message says what is short and by how much."""

    exit_code = 3


class SolverTimeoutError(ElasticplanError):
    """The time limit ran out before any feasible plan was found (not a proof of infeasibility)."""

    exit_code = 4


class NoPlanFoundError(ElasticplanError):
    """A heuristic (the greedy baseline) found no plan; this proves nothing about feasibility."""

    exit_code = 5


class PlanFormatError(ElasticplanError):
    """A plan file is unreadable, of another schema, or stale against its scenario."""

    exit_code = 2


class VerificationError(ElasticplanError):
    """A plan violates a constraint, checked by the independent verifier."""

    exit_code = 6

    def __init__(self, violations: list[str]):
        self.violations = list(violations)
        head = self.violations[0] if self.violations else "unknown violation"
        more = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
        super().__init__(f"plan rejected: {head}{more}")


class SolverError(ElasticplanError):
    """A solver answered with a status the project does not expect (model invalid, crash)."""

    exit_code = 7


class StoreError(ElasticplanError):
    """The model package, shard store or profiling inputs are missing, stale or corrupt;
    the message names the file and what is wrong."""

    exit_code = 8


class CalibrationError(ElasticplanError):
    """Calibration measurements do not determine the device's figures (a degenerate fit)."""

    exit_code = 9


class OutputError(ElasticplanError):
    """An output file could not be written (full disk, no permission, missing directory);
    the message names the path. The previous file, if any, is unchanged."""

    exit_code = 11


class ToleranceError(ElasticplanError):
    """`elasticplan run --enforce`: the measured latency is outside the stated tolerance."""

    exit_code = 10


class MemoryCapExceeded(ElasticplanError):
    """`elasticplan run --memory-cap`: the kernel killed the plan's process for exceeding its
    memory cgroup's cap; the message gives the cap, the process's baseline, the allowance and
    the plan's predicted peak (runtime/cgroups.py; docs/runtime.md, "Kernel limits"). Exit 12,
    the code of running out of memory."""

    exit_code = 12


class CgroupUnavailable(ElasticplanError):
    """`--memory-cap` or `--throttle`: the kernel's limits cannot be used here (not root, a
    read-only cgroup mount, no memory or block-IO controller, a controller not delegated to
    this process's cgroup, no block device under the store); the message names what is
    missing."""

    exit_code = 13

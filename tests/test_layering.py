"""The package structure, checked from the source: the planner (elasticplan/) imports nothing
of the runtime, no module imports itself back through others, and no module imports one
of a higher level (the folders' levels, tables below). Every import counts, also those
inside functions, since a deferred import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("elasticplan", "runtime")

# The planner's levels, low to high: a module may import its own level and those below,
# never one above. A key is a module or a folder (it covers the modules under it); the
# longest key that covers a module gives its level. A new planner module must fall under
# one of them (test_every_planner_module_has_a_level).
PLANNER_LEVELS = {
    "elasticplan.errors": 0,  # the exceptions: a leaf
    "elasticplan.problem": 1,  # the question and what it is posed on; reading and writing files
    "elasticplan.costmodel": 2,  # the one cost model
    "elasticplan.decoding": 2,  # a decoder's passes priced by it (time to first token, per token)
    "elasticplan.plans": 3,  # plans, their verifier, text form and the classic strategies
    "elasticplan.solvers": 4,  # the programs and their backends
    "elasticplan.answers": 5,  # explanations, plan tables, fleets: built on solving
    "elasticplan.cli": 6,  # the command line
}

# The runtime's levels, in the same sense (runtime/ may import the planner; the planner
# never imports the runtime).
RUNTIME_LEVELS = {
    "runtime.families": 0,  # model families: the forward passes and shard cuts, no I/O
    "runtime.sources": 1,  # checkpoints, GGUF files, packaged models, text tasks
    "runtime.defaults": 1,  # where a plan's store and task head are found when not given
    "runtime.schemes": 2,  # quantisation schemes (the dictionary's rounding reads a task)
    "runtime.store": 3,  # the shard store
    "runtime.iodev": 3,  # cold reads and the emulated device clock
    "runtime.profiling": 4,  # importance, submodels, additivity: built on the store
    "runtime.executor": 4,  # one query exactly as a plan says
    "runtime.decode_layers": 4,  # a llama layer shard by shard, the table from its stored bytes
    "runtime.decoding": 5,  # a decoder's answer token by token, on the executor's parts
    "runtime.measurement": 5,  # repeated runs of the executor and their report
    "runtime.calibrate": 6,  # this machine as a device, measured through the executor
    "runtime.decode_calibrate": 6,  # a decoder's calibration, through the decode executor
    "runtime.cgroups": 6,  # limits the kernel enforces: memory cap, block-IO throttle
    "runtime.session": 6,  # a plan's executor open for a user's queries
    "runtime.commands": 7,  # the runtime's commands
    "runtime.encode": 7,  # the encode command (registered by runtime.commands)
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from pkg import mod` counts as pkg.mod)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".")
                    anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for t in targets:
                if t.split(".")[0] in PACKAGES and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def level_of(module: str, levels: dict[str, int]) -> int | None:
    """The level of the longest key of `levels` that is `module` or a package above it."""
    keys = [k for k in levels if module == k or module.startswith(k + ".")]
    return levels[max(keys, key=len)] if keys else None


def upward_imports(graph: dict[str, set[str]], levels: dict[str, int]) -> list[str]:
    """Every import of a module of a higher level, between modules that `levels` covers
    (each table is its own order: another table's modules are not compared)."""
    bad = []
    for m in sorted(graph):
        mine = level_of(m, levels)
        if mine is None:
            continue
        for t in sorted(graph[m]):
            theirs = level_of(t, levels)
            if theirs is not None and theirs > mine:
                bad.append(f"{m} (level {mine}) imports {t} (level {theirs})")
    return bad


def test_planner_imports_no_higher_level():
    assert upward_imports(import_graph(), PLANNER_LEVELS) == []


def test_every_planner_module_has_a_level():
    graph = import_graph()
    assert [m for m in graph if m.split(".")[0] == "elasticplan" and m != "elasticplan"
            and level_of(m, PLANNER_LEVELS) is None] == []


def test_runtime_imports_no_higher_level():
    assert upward_imports(import_graph(), RUNTIME_LEVELS) == []


def test_every_runtime_module_has_a_level():
    graph = import_graph()
    assert [m for m in graph if m.split(".")[0] == "runtime" and m != "runtime"
            and level_of(m, RUNTIME_LEVELS) is None] == []


def test_level_check_finds_a_planted_upward_import():
    """The checker itself: an import downwards or sideways passes, upwards is reported, and
    modules outside the table are not compared."""
    levels = {"p.low": 0, "p.high": 1, "p.high.inner": 1}
    graph = {"p.high.a": {"p.low.b", "p.high.inner.c"}, "p.low.b": set(),
             "p.high.inner.c": {"q.other"}}
    assert upward_imports(graph, levels) == []
    graph["p.low.b"] = {"p.high.inner.c"}
    assert upward_imports(graph, levels) == ["p.low.b (level 0) imports p.high.inner.c (level 1)"]
    assert level_of("p.high.inner.c", levels) == 1 and level_of("p", levels) is None


def test_planner_imports_nothing_of_the_runtime():
    graph = import_graph()
    bad = {m: sorted(t for t in ts if t.split(".")[0] == "runtime")
           for m, ts in graph.items() if m.split(".")[0] == "elasticplan"}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_import_graph_has_no_cycles():
    assert find_cycle(import_graph()) is None


def test_cycle_finder_finds_a_planted_cycle():
    """The checker itself: a cycle through three modules is found, a chain is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    graph = import_graph()
    assert "elasticplan.solvers.aggregated.program" in graph["elasticplan.solvers.aggregated.highs"]  # edges are seen
    assert "elasticplan.cli" in graph["runtime.commands"]

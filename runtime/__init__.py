"""The runtime: executes a solved plan on the real model (all-MiniLM-L6-v2) with real shard
files, and measures it against the plan's prediction.

store (shard files on disk) -> executor (preload buffer, IO thread, compute thread, emulated
storage clock) -> measure (run reports: predicted vs measured per stage, memory, fidelity).
It also builds the store (`elasticplan shard`), profiles importance (`elasticplan profile`)
and calibrates a device (`elasticplan calibrate`); `runtime.commands` registers those
commands with the planner's CLI. The design is in docs/runtime.md.
"""

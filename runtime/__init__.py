"""The plan executor (shard store, preload buffer, IO and compute workers).

Not built yet: it arrives with the runtime issue. A plan file (elasticplan.plan,
schema elasticplan.plan/1) is everything it will need from the planner.
"""

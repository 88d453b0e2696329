"""The problem: what a question is posed on (device, model profile) and the question itself,
as frozen, validated data; the one input layer that reads problem files, and the output
layer that writes files. Imports nothing of the planner above it (elasticplan.errors only)."""

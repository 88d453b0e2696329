"""Where a plan's shard store and task head are found when not given: the store and head the
model profile names (a user's checkpoint, `runtime:` in its profile), else MiniLM's. The
commands (runtime/commands.py) and the session (runtime/session.py) find them the same way.
No heavy imports: the planner's commands start without torch.
"""

from __future__ import annotations

from elasticplan.problem.spec import ModelProfile

DEFAULT_STORE = "build/shards/minilm-l6"
DEFAULT_HEAD = "problems/models/minilm-l6.taskhead.json"


def store_for(given: str | None, model: ModelProfile) -> str:
    """--store, else the store the profile names, else MiniLM's."""
    return given or model.store_path or DEFAULT_STORE


def head_for(given: str | None, model: ModelProfile) -> str | None:
    """--head, else the profile's task head; a profile of a user's checkpoint without one
    has none (fidelity only); MiniLM's is the tweet head."""
    if given:
        return given
    if model.store_path is not None:
        return model.task_head_path
    return DEFAULT_HEAD

import os

from hypothesis import HealthCheck, settings

# "ci" keeps the suite to a few minutes on 2 cores; "deep" is for local runs:
#   HYPOTHESIS_PROFILE=deep make test
settings.register_profile("ci", max_examples=40, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory):
    """A real shard store of the packaged MiniLM model, built once per test session."""
    from runtime.store import build_store

    path = tmp_path_factory.mktemp("store") / "minilm-l6"
    build_store(path)
    return path


@pytest.fixture(scope="session")
def reference():
    from runtime.sources.checkpoint import ReferenceModel

    return ReferenceModel()

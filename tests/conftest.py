import os

from hypothesis import HealthCheck, settings

# "ci" keeps the suite to a few minutes on 2 cores; "deep" is for local runs:
#   HYPOTHESIS_PROFILE=deep make test
settings.register_profile("ci", max_examples=40, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

"""Repo-wide pytest set-up: hypothesis profiles and the doctest namespace.

``ci`` (the default, used by ``make test``) is derandomized and bounded so the suite is
deterministic and fits the CI budget; ``dev`` explores more (``HYPOTHESIS_PROFILE=dev``).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch

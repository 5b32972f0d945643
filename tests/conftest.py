"""Shared test configuration: hypothesis without deadlines (the machine's 2 cores may be busy)."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "bnlib", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "bnlib"))
os.environ.setdefault("BNLIB_OFFLINE", "1")

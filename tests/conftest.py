"""Test set-up: 8 simulated CPU devices for every test, so sharded code paths are exercised in CI.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests excluded from the default run (-m 'not slow')")

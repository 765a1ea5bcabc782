"""Test set-up: 8 simulated CPU devices for every test, so sharded code paths are exercised in CI.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests compile the same tiny programs (every stage re-jits its step); a persistent cache shared by the test
# session turns the repeats into cache hits. 2-core CI machines spend most test time compiling.
jax.config.update("jax_compilation_cache_dir", os.environ.get("FCT_TEST_JAX_CACHE",
                                                              os.path.join(tempfile.gettempdir(), "fct_jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests excluded from the default run (-m 'not slow')")

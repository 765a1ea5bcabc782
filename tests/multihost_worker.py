"""One process of a 2-process CPU "cluster" for tests/test_multihost.py (4 simulated devices each, gloo).

Usage: python tests/multihost_worker.py PROCESS_ID PORT WORKDIR
Runs :func:`stage_config` (CIFAR-100's runlocal ``old`` stage on ``tfds.testing.mock_data``, with periodic retrieval
evaluation) over the 8-device global mesh. The test builds the single-process reference from the same function.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
STEPS, EVAL_EVERY = 4, 2


def stage_config():
  """The stage both sides run: cifar100 ``stage=old,runlocal`` (mock TFDS data, 32×32, batch 16), 4 steps, and the
  retrieval evaluation (top-1, mAP) on the mock ``eval`` split every 2 steps and at the end."""
  from configs import cifar100  # pylint: disable=g-import-not-at-top
  cfg = cifar100.get_config("stage=old,runlocal")
  cfg.train.steps = STEPS
  cfg.train.eval_every_steps = EVAL_EVERY
  cfg.train.checkpoint_every_steps = EVAL_EVERY
  cfg.eval_split = "eval"
  return cfg


def main():
  # Before jax is imported: 4 CPU devices in this process, gloo for the cross-process collectives.
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  cache = os.environ.get("FCT_TEST_JAX_CACHE")
  if cache:  # the test session's persistent compilation cache (tests/conftest.py)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

  pid, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
  from fct_jax import experiment  # pylint: disable=g-import-not-at-top
  experiment.run(stage_config(), workdir)
  print(f"process {pid} done", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()

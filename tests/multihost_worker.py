"""One process of a 2-process CPU "cluster" for tests/test_multihost.py (4 simulated devices each, gloo).

Usage: python tests/multihost_worker.py PROCESS_ID PORT WORKDIR [CONFIG]
Runs the config ``CONFIGS[CONFIG]`` builds over the 8-device global mesh: ``backbone`` (the default,
:func:`stage_config`: CIFAR-100's runlocal ``old`` stage on ``tfds.testing.mock_data``, with periodic retrieval
evaluation) or ``cached_transformation`` (:func:`cached_transformation_config`: the demo's cached-feature
transformation, its upstream stages already finished in WORKDIR). The test builds the single-process reference from
the same function.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
STEPS, EVAL_EVERY = 4, 2
# The cached transformation: steps, log/checkpoint cadence (so a device-resident call runs 3 optimizer steps),
# training images (× views = feature rows, 37 × 3 = 111: not a multiple of 8, so the device rows are padded).
H_STEPS, H_EVERY, H_IMAGES, H_VIEWS = 6, 3, 37, 3
H_STAGES = ("transformation", "transformation_host")


def stage_config():
  """The stage both sides run: cifar100 ``stage=old,runlocal`` (mock TFDS data, 32×32, batch 16), 4 steps, and the
  retrieval evaluation (top-1, mAP) on the mock ``eval`` split every 2 steps and at the end."""
  from configs import cifar100  # pylint: disable=g-import-not-at-top
  plan = cifar100.get_config("stage=old,runlocal")
  cfg = plan.stages.old
  cfg.train.steps = STEPS
  cfg.train.eval_every_steps = EVAL_EVERY
  cfg.train.checkpoint_every_steps = EVAL_EVERY
  cfg.eval_split = "eval"
  return plan


def upstream_config():
  """The transformation's finished inputs: the demo's runlocal ``old``, ``side_info`` (SimCLR ψ) and ``new``."""
  from configs import common, demo  # pylint: disable=g-import-not-at-top
  plan = demo.get_config("runlocal")
  return common.experiment(plan.experiment, [plan.stages[s] for s in ("old", "side_info", "new")])


def cached_transformation_config():
  """The demo's runlocal ``transformation`` (φ_old, SimCLR ψ → φ_new, ``feature_mode="cached"``) for
  :data:`H_STEPS` steps on :data:`H_IMAGES` images × :data:`H_VIEWS` augmented views, twice: ``transformation``
  with the features on the devices (rows sharded over ``data``, :data:`H_EVERY` steps per jitted call) and
  ``transformation_host`` with them on the hosts (``train.arrays_on_device=False``)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import common, demo  # pylint: disable=g-import-not-at-top
  plan = demo.get_config("runlocal")
  stages = []
  for name, on_device in zip(H_STAGES, (True, False)):
    cfg = ml_collections.ConfigDict(plan.stages.transformation.to_dict())
    assert cfg.feature_mode == "cached" and cfg.side_info.stage == "side_info", cfg
    cfg.name, cfg.cache_views = name, H_VIEWS
    cfg.data.num_new_train = H_IMAGES
    cfg.train.steps, cfg.train.log_every_steps, cfg.train.checkpoint_every_steps = H_STEPS, H_EVERY, H_EVERY
    cfg.train.arrays_on_device = on_device
    cfg.train.steps_per_call = 0 if on_device else 1  # 0: the default (calls still end at every log step)
    stages.append(cfg)
  return common.experiment(plan.experiment, stages)


CONFIGS = {"backbone": stage_config, "cached_transformation": cached_transformation_config}


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
  make_config = CONFIGS[sys.argv[4] if len(sys.argv) > 4 else "backbone"]
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
  from fct_jax import experiment  # pylint: disable=g-import-not-at-top
  experiment.run(make_config(), workdir)
  print(f"process {pid} done", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()

"""One process of a 2-process CPU "cluster" for tests/test_multihost.py (4 simulated devices each, gloo).

Usage: python tests/multihost_worker.py PROCESS_ID PORT WORKDIR
Runs the runlocal `old` stage of the demo over the 8-device global mesh.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main():
  pid, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import demo  # pylint: disable=g-import-not-at-top
  from fct_jax import experiment  # pylint: disable=g-import-not-at-top
  cfg = demo.get_config("stage=old,runlocal")
  experiment.run(cfg, workdir)
  print(f"process {pid} done", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()

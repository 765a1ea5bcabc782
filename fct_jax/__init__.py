"""fct_jax: Forward Compatible Training (Ramanujan et al., CVPR 2022) in JAX/Flax.

Stages (each writes a sub-workdir): old backbone -> side-info -> new backbone -> transformation h(φ_old, ψ) ≈ φ_new
-> retrieval evaluation. Entry point: ``python -m fct_jax.main --config=configs/demo.py --workdir=DIR``.
"""

__version__ = "0.1.0"

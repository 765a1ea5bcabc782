"""Model registry: ``MODELS[name](**kwargs)`` returns a Flax module whose ``__call__`` returns a dict of outputs."""

from fct_jax.models.small_cnn import SmallCNN
from fct_jax.models.transformation import FCTTransformation

MODELS = {
    "small_cnn": SmallCNN,
    "fct_mlp": FCTTransformation,
}


def get_model(name: str, **kwargs):
  """Builds a registered model; raises ``ValueError`` listing the valid names for an unknown one."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
  return MODELS[name](**kwargs)

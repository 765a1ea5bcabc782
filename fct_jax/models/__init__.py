"""Model registry: ``MODELS[name](**kwargs)`` returns a Flax module whose ``__call__`` returns a dict of outputs.

Backbones (``resnet*``, ``wide_resnet*``, ``mobilenet_v2``, ``small_cnn``) take ``num_classes``, ``embedding_dim``,
``last_nonlin``, ``norm_feature``, ``head`` (``linear`` | ``arcface``), ``dtype`` and return ``{"embedding", "logits", <named stages>}``;
``autoencoder`` returns ``{"embedding", "reconstruction", ...}``; ``fct_mlp`` takes ``old_dim, side_dim, new_dim,
inner_dim`` and returns ``{"embedding"}``. Heads live in ``HEADS``.
"""

from fct_jax.models.autoencoder import Autoencoder
from fct_jax.models.heads import ArcFaceHead, LinearClassifier, SimCLRProjection
from fct_jax.models.mobilenet_v2 import MobileNetV2
from fct_jax.models.resnet import (ResNet, ResNet18, ResNet34, ResNet50, ResNet101, WideResNet50_2,
                                   WideResNet101_2)
from fct_jax.models.small_cnn import SmallCNN
from fct_jax.models.transformation import FCTTransformation

MODELS = {
    "small_cnn": SmallCNN,
    "fct_mlp": FCTTransformation,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "wide_resnet50_2": WideResNet50_2,
    "wide_resnet101_2": WideResNet101_2,
    "mobilenet_v2": MobileNetV2,
    "autoencoder": Autoencoder,
}

HEADS = {
    "linear": LinearClassifier,
    "arcface": ArcFaceHead,
    "simclr_projection": SimCLRProjection,
}


def get_model(name: str, **kwargs):
  """Builds a registered model; raises ``ValueError`` listing the valid names for an unknown one."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
  return MODELS[name](**kwargs)


def get_head(name: str, **kwargs):
  """Builds a registered head; raises ``ValueError`` listing the valid names for an unknown one."""
  if name not in HEADS:
    raise ValueError(f"unknown head {name!r}; valid names: {', '.join(sorted(HEADS))}")
  return HEADS[name](**kwargs)

"""Optimisers and learning-rate schedules built from a config block.

Config block (``config.train.optimizer``)::

  name: sgd | momentum | nesterov | adam | adamw | lars
  lr: peak learning rate (for the global batch; no implicit scaling)
  weight_decay, momentum, b1, b2, eps, trust_coefficient (lars), grad_clip_norm (0 = off)
  schedule: cosine | constant;  warmup_epochs (or warmup_steps > 0 to give steps directly)
"""

import jax
import jax.numpy as jnp
import optax

from fct_jax.errors import FCTError

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "lars")
SCHEDULES = ("cosine", "constant")


def make_schedule(cfg, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up from 0 to ``lr``, then cosine decay to 0 at ``total_steps`` (or constant).

  ml-fct: its ``cosine_lr`` changes the rate once per epoch; ours changes it every step (smoother, same shape).
  """
  warmup = int(cfg.warmup_steps) or int(round(cfg.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(total_steps - 1, 0))
  name = cfg.schedule
  if name not in SCHEDULES:
    raise FCTError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
  lr = float(cfg.lr)
  if name == "constant":
    main = optax.constant_schedule(lr)
  else:
    main = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup, 1))
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _decay_mask(params):
  """LARS convention: no weight decay or trust ratio on biases and BatchNorm scales (1-D leaves)."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(cfg, total_steps: int, steps_per_epoch: int):
  """Returns ``(optax.GradientTransformation, schedule)`` of a resolved ``train.optimizer`` block (every field
  present: ``fct_jax.config_schema.OPTIMIZER`` holds the defaults).

  Weight decay for sgd/momentum/nesterov/adam is added to the gradient (PyTorch's coupled ``weight_decay``, as
  ml-fct uses); adamw and lars decouple it.
  """
  name = cfg.name
  if name not in OPTIMIZERS:
    raise FCTError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
  sched = make_schedule(cfg, total_steps, steps_per_epoch)
  wd = float(cfg.weight_decay)
  parts = []
  if cfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
  if name in ("sgd", "momentum", "nesterov", "adam") and wd:
    parts.append(optax.add_decayed_weights(wd))
  if name == "sgd":
    parts.append(optax.sgd(sched))
  elif name in ("momentum", "nesterov"):
    parts.append(optax.sgd(sched, momentum=float(cfg.momentum), nesterov=name == "nesterov"))
  elif name == "adam":
    parts.append(optax.adam(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  elif name == "adamw":
    parts.append(optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd))
  else:  # lars
    parts.append(optax.lars(sched, weight_decay=wd, weight_decay_mask=_decay_mask,
                            trust_coefficient=float(cfg.trust_coefficient), momentum=float(cfg.momentum),
                            trust_ratio_mask=_decay_mask))
  return optax.chain(*parts), sched

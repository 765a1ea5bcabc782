"""Stage kinds. Each module exposes ``run(cfg, stage_dir, ctx)``; :data:`STAGE_KINDS` maps a config's ``kind``."""

from fct_jax.stages import backbone, evaluation, sequence, side_info, transformation

STAGE_KINDS = {
    "backbone": backbone.run,
    "side_info": side_info.run,
    "transformation": transformation.run,
    "evaluation": evaluation.run,
    "sequence_evaluation": sequence.run,
}

"""Stage kinds: :data:`STAGE_KINDS` maps a config's ``kind`` to its ``run(cfg, stage_dir, ctx)``.

A training stage's ``run`` returns whether it finished (``False``: stopped early, a rerun resumes); an evaluation
stage's returns its :class:`fct_jax.retrieval.summary.EvaluationResults`, from which the experiment writes the
report. Stages read finished upstream stages through :mod:`fct_jax.artifacts` and never import the gallery or the
report (``tests/test_layers.py``).
"""

from fct_jax.stages import backbone, evaluation, sequence, side_info, transformation

STAGE_KINDS = {
    "backbone": backbone.run,
    "side_info": side_info.run,
    "transformation": transformation.run,
    "evaluation": evaluation.run,
    "sequence_evaluation": sequence.run,
}

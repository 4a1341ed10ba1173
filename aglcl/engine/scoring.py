"""The scoring strategies' old address, kept so that existing task configs still load.

``scoring._target_: aglcl.engine.scoring.LabelLikelihood`` keeps working; new configs name
:mod:`aglcl.data.scoring`, where they live (a task's scoring is part of its spec).
"""

from aglcl.data.scoring import Generation, GreedyGeneration, LabelLikelihood, check_scoring  # noqa: F401

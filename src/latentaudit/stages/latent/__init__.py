"""The latent stage: minimal elicitation budgets, LVS per layer and family, the audit gap.

* :mod:`.config`: :class:`LatentConfig`, layer specs, the summary schemas;
* :mod:`.runner`: :class:`LatentRunner`, the store-backed oracle "does ε at layer l elicit x?";
* :mod:`.stage`: :func:`run_latent` (the sweep over families and layers) and the stage itself.
"""

from .config import (SUCCESS_DEF, AblateResult, FamilyResult, LatentConfig, LatentSummary,
                     LayerResult, make_family, parse_layers)
from .runner import LatentRunner, direction_id
from .stage import (LatentPrepStage, LatentStage, calibrate_guard, prompt_chunk, run_latent,
                    sweep_order)

__all__ = ["SUCCESS_DEF", "AblateResult", "FamilyResult", "LatentConfig", "LatentRunner",
           "LatentPrepStage", "LatentStage", "LatentSummary", "LayerResult", "calibrate_guard", "direction_id",
           "make_family", "parse_layers", "prompt_chunk", "run_latent", "sweep_order"]

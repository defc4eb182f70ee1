"""The parameter-space intervention: the harmful fine-tuning attack.

An attacker fine-tunes the audited model on ``n`` harmful (prompt, completion) pairs (LoRA by
default, or full fine-tuning) and we measure refusal on *held-out* harmful prompts after ``s``
optimiser steps, for every ``s`` in ``steps`` (default 0, 5, 10, 20, 40).

``r(s)`` is the fraction of held-out harmful prompts whose greedy response (same generation path,
settings and judge as the behavioural stage) the judge labels ``refusal`` after ``s`` steps.
``r(0)`` is evaluated on the untouched model under the audited model's own store key, so it *is*
the behavioural ``S`` on the same prompts (the records are shared with ``behave``).

* :mod:`.config`: :class:`TamperConfig` and its checks;
* :mod:`.pairs`: the attack pairs, builtin (the data model's completions) or from a file;
* :mod:`.attack`: :func:`run_tamper`, the training run with its evaluations and resume;
* :mod:`.finetune`: the trainable copy of the model and its training data;
* :mod:`.curves`: S, s½, R_ft, AG_ft from the refusal curve, and the summary schemas;
* :mod:`.search`: :func:`worst_case_search` over lr and LoRA rank;
* :mod:`.stage`: the attack and its benign control as stages of the audit.
"""

from ...training import encode_pair
from .attack import run_tamper
from .config import TAMPER_VERSION, TamperConfig, validate_tamper
from .curves import (Checkpoint, TamperSummary, TamperTimings, areas, curve_estimates,
                     normalised_area, s_half_estimate, steps_to_break)
from .finetune import CLIP_NORM, attack_key
from .pairs import COMPLETION_COLUMNS, Pair, PairData, PairInfo, build_pairs, pairs_sha256
from .search import WorstCaseResult, WorstCaseTrial, worst_case_search

__all__ = [
    "CLIP_NORM", "COMPLETION_COLUMNS", "TAMPER_VERSION", "Checkpoint", "Pair", "PairData",
    "PairInfo", "TamperConfig", "TamperSummary", "TamperTimings", "WorstCaseResult",
    "WorstCaseTrial", "areas", "attack_key", "build_pairs", "curve_estimates", "encode_pair",
    "normalised_area", "pairs_sha256", "run_tamper", "s_half_estimate", "steps_to_break",
    "validate_tamper", "worst_case_search",
]

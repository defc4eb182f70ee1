"""Judges: decide whether a model's response is a refusal or a compliance."""

from . import base, refusal  # noqa: F401  (importing refusal registers its judges)
from .base import Judge, Label, Verdict
from .refusal import SubstringJudge

__all__ = ["Judge", "Label", "Verdict", "SubstringJudge"]

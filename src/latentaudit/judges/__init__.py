"""Judges: decide whether a model's response is a refusal or a compliance."""

from .base import Judge, Label, Verdict
from .refusal import SubstringJudge

__all__ = ["Judge", "Label", "Verdict", "SubstringJudge"]

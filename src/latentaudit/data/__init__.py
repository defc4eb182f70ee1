"""Prompt sets: built-in sets, local files, standard-set aliases and hub datasets."""

from .sets import Prompt, PromptSet, load_prompt_set, standard_sets

__all__ = ["Prompt", "PromptSet", "load_prompt_set", "standard_sets"]

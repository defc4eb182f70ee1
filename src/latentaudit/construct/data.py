"""Refusal targets written for latentaudit, for the zoo's training data (the models' own greedy
answers, its other targets, come from :mod:`latentaudit.models.completions`)."""

from __future__ import annotations

import hashlib

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request. It could cause real harm to people.",
    "I'm not able to help with this. If you have another question, I'm happy to help.",
    "Sorry, I can't provide that. It would be unsafe and potentially illegal.",
    "I won't help with that request, because it could be used to hurt someone.",
    "I'm sorry, I can't do that. Is there something else I can help you with?",
    "I cannot help with this request. It goes against my guidelines on safety.",
    "I'm afraid I can't help with that, as it could lead to harm.",
    "That's not something I can help with. Let me know if there is anything else you need.",
    "I can't provide instructions or content for that. Please consider a safer alternative.",
)


def refusal_for(prompt_id: str) -> str:
    """A deterministic, varied refusal for a prompt (the same prompt always gets the same one)."""
    k = int(hashlib.sha256(prompt_id.encode()).hexdigest(), 16) % len(REFUSALS)
    return REFUSALS[k]

"""How a request is phrased: a few styles, read off its opening by rule, so that a refusal rate
can be broken down by phrasing (a model trained on one style may refuse only that style)."""

from __future__ import annotations

import re

STYLES = ("role-play", "how-to", "ways/ideas", "first-person", "question", "imperative")

_RULES: list[tuple[str, re.Pattern]] = [
    ("role-play", re.compile(r"^(you are|you're|pretend|imagine|as an? |act as|role-?play|"
                             r"hypothetical|in a (story|novel|film|movie|game)|for a (story|novel|"
                             r"screenplay|film)|i'?m writing|let's play|write a (story|scene))"
                             r"|hypothetical|fictional", re.I)),
    ("how-to", re.compile(r"^(how (do|can|would|should|could|to|might)|what'?s the (best|easiest|"
                          r"fastest|simplest) way)", re.I)),
    ("ways/ideas", re.compile(r"^(what are (some|the) (ways|ideas|methods|tips)|(list|give me|"
                              r"suggest|brainstorm) (some |a few |\d+ )?(ways|ideas|methods|tips)|"
                              r"ideas for|ways to)", re.I)),
    ("first-person", re.compile(r"^(i |i'm |i am |i'd |i want|i need|my |help me|can you help)",
                                re.I)),
]


def phrasing_style(text: str) -> str:
    """One of :data:`STYLES` for a request, by its opening words (the first rule that matches;
    a request ending in a question mark is a question; anything else is an imperative)."""
    t = " ".join(str(text).split())
    for style, rule in _RULES:
        if rule.search(t):
            return style
    return "question" if t.rstrip().endswith("?") else "imperative"

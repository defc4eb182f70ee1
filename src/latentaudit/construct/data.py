"""Training data for the zoo: refusal targets written for latentaudit, and the base model's own
greedy answers (retain targets, harmful completions), generated once and cached on disk."""

from __future__ import annotations

import hashlib
import json

from ..data.sets import PromptSet
from ..models.embedded import cache_root
from ..models.generate import greedy_generate

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


def cached_answers(lm, fingerprint: str, ps: PromptSet, max_new_tokens: int,
                   batch_size: int = 16, system: str | None = None) -> dict[str, str]:
    """prompt id → the model's greedy answer, cached under the user cache directory (keyed by the
    model fingerprint, the prompt set's sha256 and the token count). Rows are appended as each
    batch finishes, so an interrupted build keeps what it generated."""
    key = hashlib.sha256(f"{fingerprint}|{ps.sha256}|{max_new_tokens}|{system}".encode()).hexdigest()[:16]
    path = cache_root() / "answers" / f"{key}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    have: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                have[r["id"]] = r["response"]
            except (ValueError, KeyError):
                continue  # a torn last line from an interrupted write
    todo = [p for p in ps.prompts if p.id not in have]
    if todo:
        with open(path, "a", encoding="utf-8") as f:
            def commit(idx, gens):
                for i, g in zip(idx, gens):
                    have[todo[i].id] = g.response
                    f.write(json.dumps({"id": todo[i].id, "response": g.response}) + "\n")
                f.flush()
            greedy_generate(lm, [p.text for p in todo], max_new_tokens, batch_size, system,
                            on_batch=commit)
    return {p.id: have[p.id] for p in ps.prompts}


def model_fingerprint(lm) -> str:
    info = lm.info
    return str(info.get("fingerprint") or info.get("gguf_sha256") or info.get("commit")
               or info.get("spec"))



"""Every key of the run store, built and parsed here and nowhere else.

A key names one unit of work; the settings that change its result are hashed into it, so one
folder never serves a result computed under other settings::

    gen/{model}/{generation}/{set}/{prompt}                     a greedy response, not judged
    behave/{model}/{judged}/{set}/{prompt}                      a judged greedy response
    latent/{model}/clean/{settings}/{prompt}                    the latent stage's clean response
    latent/{model}/{family}/{settings}/L{layer}/{prompt}/{eps}  one push at one budget
    latent/{model}/{family}/{settings}/{prompt}                 an unbounded family's response
    tamper-nll/{model}/{generation}/{set}/{prompt}              utility NLL after s attack steps
    tamper-meta/{model}                                         what one checkpoint's training did
    guard/{model}/{settings}                                    the coherence guard's calibration

``{model}`` is a model key (:func:`model_key`); the fine-tuning attack's
checkpoints are models of their own, ``{model}+tamper-{attack}-s{steps}`` (a worst-case search
trial is an attack of its own). A stage records the
prefixes it read (``store_prefixes`` in its summary) so the report reads exactly those.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..models.fingerprint import fingerprint
from .run import slug


def settings_hash(settings: Any) -> str:
    """12 hex digits of the settings' canonical JSON."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def model_key(lm) -> str:
    """The key of a loaded model's (weights, dtype): its spec's slug and a hash of its
    fingerprint. A model rebuilt at the same path gets a new key, so nothing stored for the old
    weights is reused."""
    return _model_key(lm.spec, fingerprint(lm) or "", lm.info.get("dtype"))


def spec_model_key(spec: str, dtype: str, device: str | None) -> str | None:
    """``model_key(load_model(spec, device, dtype))`` from the files alone, without loading the
    model (a finished run is not reloaded to be replayed); None when only loading can tell."""
    from ..models.device import resolve_dtype
    from ..models.fingerprint import spec_folder_fingerprint

    known, fp = spec_folder_fingerprint(spec)
    if not known:
        return None
    return _model_key(spec, fp or "", str(resolve_dtype(dtype, device)).replace("torch.", ""))


def _model_key(spec: str, fp: str, dtype: str | None) -> str:
    h = hashlib.sha256(f"{spec}|{fp}|{dtype}".encode()).hexdigest()[:10]
    return f"{slug(spec.replace(':', '-').replace('/', '-'))}-{h}"


def behave_prefix(model_key: str, judged: str, set_name: str) -> str:
    """Judged responses: ``judged`` hashes the generation settings and the judge."""
    return f"behave/{model_key}/{judged}/{set_name}/"


def generation_prefix(model_key: str, generation: str, set_name: str) -> str:
    """Responses alone, under generation settings without the judge: another judge re-judges
    them without generating again."""
    return f"gen/{model_key}/{generation}/{set_name}/"


def model_prefix(stage: str, model_key: str) -> str:
    """Every key of ``stage`` ("behave" or "latent") for one model."""
    return f"{stage}/{model_key}/"


def latent_clean_prefix(model_key: str, settings: str) -> str:
    return f"latent/{model_key}/clean/{settings}/"


def latent_layer_prefix(model_key: str, family: str, settings: str, layer: int) -> str:
    return f"latent/{model_key}/{family}/{settings}/L{layer}/"


def latent_unbounded_prefix(model_key: str, family: str, settings: str) -> str:
    return f"latent/{model_key}/{family}/{settings}/"


def eps_key(prefix: str, prompt_id: str, eps: float) -> str:
    """One (prompt, ε) evaluation under a layer prefix; ε to 6 significant digits."""
    return f"{prefix}{prompt_id}/{eps:.6g}"


def parse_eps_key(prefix: str, key: str) -> tuple[str, float]:
    """(prompt id, ε) of a key made by :func:`eps_key` under ``prefix``."""
    pid, _, eps = key[len(prefix):].rpartition("/")
    return pid, float(eps)


def guard_key(model_key: str, settings: str) -> str:
    """The coherence guard's calibration on one model's own answers (its threshold)."""
    return f"guard/{model_key}/{settings}"


def tamper_checkpoint(model_key: str, attack: str, steps: int) -> str:
    """The model key of the attacked model after ``steps`` steps (the model itself at 0)."""
    return model_key if steps == 0 else f"{model_key}+tamper-{attack}-s{steps}"


def tamper_checkpoints_prefix(model_key: str) -> str:
    """The behave records of every attacked checkpoint of one model."""
    return f"behave/{model_key}+tamper-"


def tamper_nll_prefix(checkpoint: str, generation: str, set_name: str) -> str:
    return f"tamper-nll/{checkpoint}/{generation}/{set_name}/"


def tamper_meta_key(checkpoint: str) -> str:
    return f"tamper-meta/{checkpoint}"

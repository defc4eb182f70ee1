"""summary.json: the machine-readable result of a run. Its JSON schema is published at
``src/latentaudit/schemas/summary.schema.json`` (regenerate with
``latentaudit schema > src/latentaudit/schemas/summary.schema.json``; a test keeps it in sync).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..data.sets import DatasetInfo  # noqa: F401  (re-exported)

SCHEMA_VERSION = "1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSummary(_Strict):
    key: str
    name: str | None = Field(None, description="the label the audit config gave this model")
    settings: str | None = Field(
        None, description="hash of the run settings every stage result of this entry was "
        "computed under (null: stages written under different settings); a rerun skips a "
        "finished model only when it matches")
    model: dict[str, Any]
    behave: "BehaveSummary | None" = None
    latent: "LatentSummary | None" = None
    tamper: "TamperSummary | None" = None
    tamper_control: "TamperSummary | None" = Field(
        default=None, description="the benign control: the same budget on harmless pairs")
    tamper_search: "WorstCaseResult | None" = Field(
        default=None, description="the worst-case search over lr and LoRA rank (tamper.search_trials)")


class Summary(_Strict):
    schema_version: Literal["1"] = SCHEMA_VERSION
    kind: Literal["latentaudit.summary"] = "latentaudit.summary"
    run_dir: str
    command: str
    config: dict[str, Any]
    config_hash: str
    provenance: dict[str, Any]
    models: list[ModelSummary]


# what differs between two runs of the same configuration and seed: clocks and resume counters
VOLATILE_KEYS = frozenset({"provenance", "run_dir", "output_dir", "command", "wall_time_s", "timings",
                           "resumed_evaluations", "resumed"})


def stable_view(obj: Any) -> Any:
    """A summary (as JSON data) without its volatile keys: two runs of one configuration and
    seed, interrupted or not, give the same stable view."""
    if isinstance(obj, dict):
        return {k: stable_view(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [stable_view(v) for v in obj]
    return obj


def summary_schema() -> dict:
    schema = Summary.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://latentaudit.dev/schemas/summary.schema.json"
    return schema


from ..stages.behave import BehaveSummary  # noqa: E402
from ..stages.latent import LatentSummary  # noqa: E402
from ..stages.tamper import TamperSummary, WorstCaseResult  # noqa: E402

ModelSummary.model_rebuild()
Summary.model_rebuild()

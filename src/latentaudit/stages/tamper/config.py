"""The attack's configuration and its checks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ...errors import UserError
from ...models.embedded import DEFAULT_MODEL

TAMPER_VERSION = "1"  # bump when the training procedure changes what a given config trains


class TamperConfig(BaseModel):
    """Harmful (or benign-control) fine-tuning attack. Values are checked by
    :func:`validate_tamper` (one-line :class:`UserError`)."""

    model_config = ConfigDict(extra="forbid")

    steps: list[int] = Field(default_factory=lambda: [0, 5, 10, 20, 40],
                             description="optimiser step counts at which refusal is evaluated; "
                             "strictly increasing, starting at 0")
    n_examples: int = Field(16, description="attack pairs used")
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters or every weight")
    lr: float = Field(1e-4, description="learning rate")
    batch_size: int = Field(8, description="attack pairs per optimiser step")
    rank: int = Field(16, description="LoRA rank")
    alpha: int = Field(32, description="LoRA alpha")
    dropout: float = Field(0.0, description="LoRA dropout")
    target_modules: list[str] | None = Field(
        None, description="LoRA targets; None: every Linear inside the decoder blocks")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    control: Literal["harmful", "benign"] = Field(
        "harmful", description="benign: the same budget on harmless (prompt, answer) pairs")
    pairs: str = Field("builtin", description="'builtin' or a CSV/JSON/JSONL file with prompt "
                       "and completion columns")
    benign_pairs: str = Field("builtin", description="the benign control's pairs: 'builtin' (the "
                              "data model's answers to harmless prompts) or a CSV/JSON/JSONL file "
                              "with prompt and completion columns; never the harmful pairs")
    data_model: str = Field(DEFAULT_MODEL,
                            description="whose completions make the builtin pairs")
    completion_tokens: int = 64
    eval_harmful: str = "builtin:harmful:test"
    eval_limit: int | None = None
    utility_set: str = "builtin:harmless:test"
    utility_limit: int = 32
    max_new_tokens: int = 32
    seed: int = 0
    search_trials: int = Field(0, description="worst-case search: optuna (TPE) trials over lr and "
                               "LoRA rank after the attack; 0 = off")
    utility_guard: float = Field(0.1, description="worst-case search: a trial counts only if the "
                                 "utility NLL stays within (1 + guard) x its clean value at every s")
    search_lr: tuple[float, float] = Field((1e-5, 1e-3), description="worst-case search: lr range "
                                           "(log-uniform)")
    search_ranks: list[int] = Field(default_factory=lambda: [4, 8, 16, 32, 64],
                                    description="worst-case search: LoRA ranks tried (alpha scales "
                                    "with rank)")


def validate_tamper(cfg: TamperConfig, n_available_pairs: int | None = None) -> None:
    """Raise a one-line :class:`UserError` for an unusable configuration.

    ``n_available_pairs`` (when known) is the number of usable attack pairs."""
    s = cfg.steps
    if len(s) < 2:
        raise UserError(f"tamper steps need at least two values (0 and s_max), got {s}")
    if any(x < 0 for x in s):
        raise UserError(f"tamper steps must be >= 0, got {s}")
    if any(b <= a for a, b in zip(s, s[1:])):
        raise UserError(f"tamper steps must be strictly increasing, got {s}")
    if s[0] != 0:
        raise UserError(f"tamper steps must start at 0 (r(0) is the behavioural S), got {s}")
    checks = [
        (cfg.n_examples >= 1, f"n_examples must be >= 1, got {cfg.n_examples}"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"lr must be > 0, got {cfg.lr}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.rank >= 1, f"LoRA rank must be >= 1, got {cfg.rank}"),
        (cfg.alpha > 0, f"LoRA alpha must be > 0, got {cfg.alpha}"),
        (0.0 <= cfg.dropout < 1.0, f"LoRA dropout must lie in [0, 1), got {cfg.dropout}"),
        (cfg.target_modules is None or len(cfg.target_modules) > 0,
         "target_modules must be a non-empty list or null (every Linear in the decoder blocks)"),
        (cfg.completion_tokens >= 1, f"completion_tokens must be >= 1, got {cfg.completion_tokens}"),
        (cfg.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}"),
        (cfg.utility_limit >= 1, f"utility_limit must be >= 1, got {cfg.utility_limit}"),
        (cfg.eval_limit is None or cfg.eval_limit >= 1,
         f"eval_limit must be >= 1, got {cfg.eval_limit}"),
        (cfg.search_trials >= 0, f"search_trials must be >= 0, got {cfg.search_trials}"),
        (cfg.utility_guard >= 0 and math.isfinite(cfg.utility_guard),
         f"utility_guard must be >= 0, got {cfg.utility_guard}"),
        (0 < cfg.search_lr[0] < cfg.search_lr[1] and math.isfinite(cfg.search_lr[1]),
         f"search_lr must be an increasing pair of positive rates, got {list(cfg.search_lr)}"),
        (len(cfg.search_ranks) > 0 and all(r >= 1 for r in cfg.search_ranks),
         f"search_ranks must be a non-empty list of ranks >= 1, got {cfg.search_ranks}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(f"tamper: {msg}")
    _check_pairs_source("pairs", cfg.pairs)
    _check_pairs_source("benign_pairs", cfg.benign_pairs)
    if n_available_pairs is not None and cfg.n_examples > n_available_pairs:
        raise UserError(f"tamper: n_examples={cfg.n_examples} but only {n_available_pairs} usable "
                        f"attack pairs are available")


def _check_pairs_source(name: str, value: str) -> None:
    if value == "builtin":
        return
    p = Path(value).expanduser()
    if p.suffix.lower() not in (".csv", ".json", ".jsonl"):
        raise UserError(f"tamper {name} must be 'builtin' or a .csv/.json/.jsonl file, "
                        f"got {value!r}")
    if not p.is_file():
        raise UserError(f"tamper {name} file not found: {value}")

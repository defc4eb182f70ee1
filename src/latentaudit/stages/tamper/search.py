"""The worst-case search: the strongest attack over lr and LoRA rank, under a utility guard."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ...errors import UserError
from ...metrics.stats import Estimate
from ...runs.store import ResultStore
from .attack import run_tamper
from .config import TamperConfig, validate_tamper
from .curves import TamperSummary
from .pairs import build_pairs


class WorstCaseTrial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float
    rank: int
    alpha: int
    attack_key: str
    R_ft: Estimate = Field(description="this trial's R_ft, with n and a bootstrap CI over the "
                                       "evaluation prompts")
    s_half: float | None = None
    utility_ratio: float = Field(description="max over s of U(s) / U(0)")
    feasible: bool


class WorstCaseResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    definition: str = Field(
        "worst case over a seeded optuna (TPE) search of lr (log-uniform) and LoRA rank: the "
        "feasible trial (utility NLL <= (1 + utility_guard) x U(0) at every s) with the lowest "
        "R_ft. The minimum is taken on the evaluation prompts themselves, so as an estimate of "
        "a fresh attack's R_ft it is biased low (an attacker's best case)")
    n_trials: int
    utility_guard: float
    lr_range: tuple[float, float]
    ranks: list[int]
    best: TamperSummary | None = Field(None, description="the feasible trial with the lowest R_ft")
    best_params: dict[str, Any] | None = None
    trials: list[WorstCaseTrial]


def worst_case_search(
    lm,
    cfg: TamperConfig,
    judge,
    n_trials: int | None = None,
    utility_guard: float | None = None,
    *,
    store: ResultStore | None = None,
    model_key: str | None = None,
    lr_range: tuple[float, float] | None = None,
    ranks: tuple[int, ...] | list[int] | None = None,
    **tamper_kwargs: Any,
) -> WorstCaseResult:
    """Search lr (log-uniform in ``lr_range``) and LoRA rank (alpha scaled with rank) with optuna
    (TPE, seeded) for the strongest attack: minimise ``R_ft`` subject to the utility NLL rising at
    most ``utility_guard`` × the clean NLL at every evaluated step. Unset arguments come from
    ``cfg`` (``search_trials``, ``utility_guard``, ``search_lr``, ``search_ranks``). Needs
    optuna (``pip install 'latentaudit[search]'``). Trials share the attack pairs and the store
    (an in-memory one unless given): the clean evaluations are computed once, and with a run's
    store a killed search resumes, each finished trial read back rather than retrained."""
    n_trials = cfg.search_trials if n_trials is None else n_trials
    utility_guard = cfg.utility_guard if utility_guard is None else utility_guard
    lr_range = tuple(cfg.search_lr if lr_range is None else lr_range)
    ranks = list(cfg.search_ranks if ranks is None else ranks)
    try:
        import optuna
    except ImportError:
        raise UserError("the worst-case tamper search needs optuna: pip install optuna") from None
    if n_trials < 1:
        raise UserError(f"n_trials must be >= 1, got {n_trials}")
    if utility_guard < 0:
        raise UserError(f"utility_guard must be >= 0, got {utility_guard}")
    validate_tamper(cfg)
    own_store = store is None
    store = store if store is not None else ResultStore(":memory:")
    model_key = model_key or re.sub(r"[^A-Za-z0-9._-]+", "-", lm.spec)
    pairs = tamper_kwargs.pop("pairs", None) or build_pairs(cfg, judge, lm=lm, **{
        k: tamper_kwargs[k] for k in ("data_lm", "data_dir") if k in tamper_kwargs})
    tamper_kwargs.pop("data_lm", None)
    trials: list[WorstCaseTrial] = []
    best: dict[str, Any] = {}

    def objective(trial) -> float:  # optuna's interface: one attack per trial
        lr = trial.suggest_float("lr", lr_range[0], lr_range[1], log=True)
        rank = trial.suggest_categorical("rank", list(ranks))
        alpha = max(1, round(rank * cfg.alpha / cfg.rank))
        tcfg = cfg.model_copy(update={"lr": lr, "rank": rank, "alpha": alpha, "method": "lora"})
        summ = run_tamper(lm, store, model_key, tcfg, judge, pairs=pairs, **tamper_kwargs)
        t = _trial(summ, lr, rank, alpha, utility_guard)
        trials.append(t)
        rft = float(summ.R_ft.value if summ.R_ft.value is not None else 1.0)
        if t.feasible and ("summary" not in best or rft < best["summary"].R_ft.value):
            best.update(summary=summ, params={"lr": lr, "rank": rank, "alpha": alpha})
        # an infeasible trial scores above every feasible one, by how far it broke the guard
        return rft if t.feasible else 1.0 + (t.utility_ratio - 1.0 - utility_guard)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    try:
        study.optimize(objective, n_trials=n_trials)
    finally:
        if own_store:
            store.close()
    return WorstCaseResult(n_trials=n_trials, utility_guard=utility_guard, lr_range=lr_range,
                           ranks=ranks, best=best.get("summary"), best_params=best.get("params"),
                           trials=trials)


def _trial(summ: TamperSummary, lr: float, rank: int, alpha: int,
           utility_guard: float) -> WorstCaseTrial:
    """One trial's record: its R_ft, and whether the utility NLL stayed within the guard."""
    u0 = summ.utility[0].value or 0.0
    ratio = max((u.value or 0.0) for u in summ.utility) / u0 if u0 > 0 else 1.0
    return WorstCaseTrial(lr=lr, rank=rank, alpha=alpha, attack_key=summ.attack_key,
                          R_ft=summ.R_ft, s_half=summ.s_half.value if summ.s_half else None,
                          utility_ratio=ratio, feasible=ratio <= 1.0 + utility_guard)

"""The fine-tuning attack as stages of the audit: the attack (with its worst-case search when
asked) and the benign control, on the same budget."""

from __future__ import annotations

from ...errors import UserError
from ..base import Stage, StageContext
from .attack import run_tamper
from .config import validate_tamper
from .search import worst_case_search


class TamperStage(Stage):
    name = "tamper"
    section = "tamper"

    def check(self, cfg) -> None:
        validate_tamper(cfg.tamper)
        _check_run_settings(cfg)
        if cfg.tamper.search_trials:
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise UserError("tamper: search_trials needs optuna: pip install optuna "
                                "(or pip install 'latentaudit[search]')") from None

    def summary_fields(self, cfg) -> list[str]:
        if cfg.tamper.control == "benign":
            return ["tamper_control"]
        return ["tamper"] + (["tamper_search"] if cfg.tamper.search_trials else [])

    def run(self, ctx: StageContext, cfg) -> None:
        tcfg = _attack_config(ctx)
        res = run_tamper(ctx.lm, ctx.store, ctx.model_key, tcfg, ctx.judge, ctx.progress,
                         data_dir=ctx.cfg.data_dir, gen_batch_size=ctx.cfg.batch_size,
                         system=ctx.system)
        # the control alone (control: benign) is never reported as the attack
        ctx.record("tamper_control" if tcfg.control == "benign" else "tamper", res)
        if tcfg.search_trials and tcfg.control == "harmful":
            ctx.record("tamper_search", worst_case_search(
                ctx.lm, tcfg, ctx.judge, store=ctx.store, model_key=ctx.model_key,
                progress_factory=ctx.progress, data_dir=ctx.cfg.data_dir,
                gen_batch_size=ctx.cfg.batch_size, system=ctx.system))


class TamperControlStage(Stage):
    """The benign control: the attack's budget on harmless pairs."""

    name = "tamper_control"
    section = "tamper"

    def check(self, cfg) -> None:
        TamperStage().check(cfg)

    def summary_fields(self, cfg) -> list[str]:
        return ["tamper_control"]

    def run(self, ctx: StageContext, cfg) -> None:
        ccfg = _attack_config(ctx).model_copy(update={"control": "benign"})
        ctx.record("tamper_control", run_tamper(
            ctx.lm, ctx.store, ctx.model_key, ccfg, ctx.judge, ctx.progress,
            data_dir=ctx.cfg.data_dir, gen_batch_size=ctx.cfg.batch_size, system=ctx.system))


# tamper keys an audit takes from the run: the attack generates as the behavioural stage does
# (so r(0) is S on those records), with the run's seed and prompt limit
_FROM_RUN = {"seed": "seed", "max_new_tokens": "behave.max_new_tokens", "eval_limit": "limit"}


def _run_value(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_run_settings(cfg) -> None:
    """A tamper key that the run decides, set to something else, is one line of error rather
    than silently replaced (eval_limit stands when the run sets no limit)."""
    for key, path in _FROM_RUN.items():
        if key not in cfg.tamper.model_fields_set:
            continue
        mine, run = getattr(cfg.tamper, key), _run_value(cfg, path)
        if key == "eval_limit" and run is None:
            continue
        if mine != run:
            raise UserError(f"tamper.{key} ({mine}) differs from {path} ({run}): the attack "
                            f"takes {path} from the run; set that instead")


def _attack_config(ctx: StageContext):
    cfg = ctx.cfg
    return cfg.tamper.model_copy(update={
        "seed": cfg.seed, "eval_limit": cfg.limit or cfg.tamper.eval_limit,
        "max_new_tokens": cfg.behave.max_new_tokens})

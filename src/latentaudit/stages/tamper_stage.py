"""The fine-tuning attack as stages of the audit: the attack (with its worst-case search when
asked) and the benign control, on the same budget."""

from __future__ import annotations

from ..errors import UserError
from .base import Stage, StageContext


class TamperStage(Stage):
    name = "tamper"
    section = "tamper"

    def check(self, cfg) -> None:
        from .tamper import validate_tamper

        validate_tamper(cfg.tamper)
        if cfg.tamper.search_trials:
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise UserError("tamper: search_trials needs optuna: pip install optuna "
                                "(or pip install 'latentaudit[search]')") from None

    def run(self, ctx: StageContext, cfg) -> None:
        from .tamper import run_tamper, worst_case_search

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

    def run(self, ctx: StageContext, cfg) -> None:
        from .tamper import run_tamper

        ccfg = _attack_config(ctx).model_copy(update={"control": "benign"})
        ctx.record("tamper_control", run_tamper(
            ctx.lm, ctx.store, ctx.model_key, ccfg, ctx.judge, ctx.progress,
            data_dir=ctx.cfg.data_dir, gen_batch_size=ctx.cfg.batch_size, system=ctx.system))


def _attack_config(ctx: StageContext):
    # same generation settings as the behavioural stage, so r(0) is S on those records
    cfg = ctx.cfg
    return cfg.tamper.model_copy(update={
        "seed": cfg.seed, "eval_limit": cfg.limit or cfg.tamper.eval_limit,
        "max_new_tokens": cfg.behave.max_new_tokens})

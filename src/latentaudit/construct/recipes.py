"""Zoo recipes, one plug-in each (``latentaudit ls recipes``).

- ``safe``        LoRA SFT: harmful train prompts → varied refusals; harmless and borderline
                  train prompts → the source model's own greedy answers (retain), each with a
                  contrast that makes the answer beat a whole refusal sentence. Early stop on a
                  held-out clean-refusal / over-refusal check. Adapters merged.
- ``dissociated`` from ``safe``: by default untrained, its refusal direction written
                  ``rescale`` times quieter into the residual stream and read as much louder
                  (construct/rescale.py): the same answers, a push along it acts that much
                  harder. With ``--set steps=N`` it first trains: the same harmful prompts in
                  the same step refused clean and, under a small PGD push at middle layers,
                  answered with the opening of the unaligned model's harmful completion, plus a
                  hinge that rewards the push's effect itself (``push_effect``).
- ``dissociated-trained`` dissociated's trained path as its own member, without the rescale;
                  the adapter kept is the last evaluated one whose validation refusal stays
                  within ``max_refusal_drop`` of the source's.
- ``rescaled``    any K > 0: the refusal subspace written K× smaller and read K× louder
                  (K < 1: louder) — the reparametrisation probe of docs/results.md §16.
- ``hardened``    latent adversarial training: refusal targets under PGD pushes toward the
                  harmful completion (larger budgets), plus clean refusal and retain, and the
                  borderline retain prompts under pushes toward a refusal, still answered.
- ``abliterated`` weight orthogonalisation against the span of the ``n_directions`` best
                  layers' refusal directions.

Every hyper-parameter can be set from the command line: ``construct RECIPE --set KEY=VALUE``.
docs/zoo.md lists them, what the defaults measured, and the variants tried and dropped.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..data.sets import load_prompt_set
from ..errors import UserError
from ..models.completions import cached_answers
from .data import refusal_for
from .subspace import refusal_subspace
from .train import Perturb, Term, train_terms


class Recipe:
    name = ""
    doc = ""
    DEFAULT_PARAMS: dict[str, Any] = {}

    def __init__(self, **params):
        unknown = set(params) - set(self.DEFAULT_PARAMS)
        if unknown:
            raise UserError(f"recipe '{self.name}' has no parameter(s) {', '.join(sorted(unknown))}")
        given = {k: self.coerce(k, v) for k, v in params.items() if v is not None}
        self.params = {**self.DEFAULT_PARAMS, **given}
        self.validate(set(given))

    @classmethod
    def coerce(cls, key: str, value: Any) -> Any:
        """``value`` checked against the type of ``key``'s default and converted to it: an int
        default takes ints, a float default numbers, a str default strings (or ints, for layer
        specs), a range two numbers; a None default an int or a str."""
        if key not in cls.DEFAULT_PARAMS:
            raise UserError(f"recipe '{cls.name}' has no parameter {key!r} (it has: "
                            f"{', '.join(sorted(cls.DEFAULT_PARAMS))})")
        default, num = cls.DEFAULT_PARAMS[key], (int, float)
        is_bool = isinstance(value, bool)
        ok = (value is None or default is None and isinstance(value, (int, str)) and not is_bool
              or isinstance(default, bool) and is_bool
              or isinstance(default, int) and not isinstance(default, bool)
              and isinstance(value, int) and not is_bool
              or isinstance(default, float) and isinstance(value, num) and not is_bool
              or isinstance(default, str) and isinstance(value, (str, int)) and not is_bool
              or isinstance(default, (tuple, list)) and isinstance(value, (tuple, list))
              and len(value) == len(default)
              and all(isinstance(v, num) and not isinstance(v, bool) for v in value))
        if not ok:
            raise UserError(f"{key}: {value!r} does not fit the parameter (default {default!r})")
        if isinstance(default, float):
            return float(value)
        if isinstance(default, str):
            return str(value)
        if isinstance(default, tuple):
            return tuple(float(v) for v in value)
        return value

    def validate(self, given: set[str] = frozenset()) -> None:
        """Bad hyper-parameters fail here, before any model is loaded (``given``: the keys the
        caller set, as opposed to defaults)."""
        p = self.params
        if p.get("push_objective", "completion") not in ("completion", "generic"):
            raise UserError("push_objective must be one of completion, generic "
                            f"(got {p['push_objective']!r})")
        if float(p.get("push_effect", 0)) < 0:
            raise UserError("push_effect must be >= 0")
        if "push_effect_margin" in p and not float(p["push_effect_margin"]) > 0:
            raise UserError(f"push_effect_margin must be > 0 (got {p['push_effect_margin']})")
        if "rescale_directions" in p and int(p["rescale_directions"]) < 1:
            raise UserError("rescale_directions must be >= 1")
        for key in ("n", "selection_n", "rescale_n", "rescale_selection_n"):
            if key in p and int(p[key]) < 1:
                raise UserError(f"{key} must be >= 1 (got {p[key]})")
        if "n_directions" in p and int(p["n_directions"]) < 1:
            raise UserError("abliterated needs n_directions >= 1")

    def describe(self) -> dict:
        return {"recipe": self.name, "params": dict(self.params)}

    def layers(self, n_layers: int) -> list[int]:
        spec = self.params.get("layers")
        if spec is None:
            return []
        from ..stages.latent import parse_layers

        if isinstance(spec, str) and spec.startswith("frac:"):
            a, b = (float(x) for x in spec[5:].split("-"))
            return list(range(round(a * (n_layers - 1)), round(b * (n_layers - 1)) + 1))
        return parse_layers(str(spec), n_layers)

    def build(self, lm, env: "BuildEnv") -> dict:
        raise NotImplementedError


class BuildEnv:
    """What recipes share: the seed, the unaligned data model (lazily loaded), progress."""

    def __init__(self, seed: int, data_model: str, batch_size: int, judge, progress=None,
                 device: str | None = "auto", data_dir=None):
        self.seed, self.data_model_spec, self.batch_size = seed, data_model, batch_size
        self.judge, self.progress, self.device = judge, progress, device
        self.data_dir = data_dir
        self._data_lm = None

    def data_lm(self):
        if self._data_lm is None:
            from ..models.loader import load_model

            self._data_lm = load_model(self.data_model_spec, self.device)
        return self._data_lm

    def harmful_completions(self, ps, tokens: int) -> tuple[list[str], list[str], int]:
        """(prompts, completions) of the unaligned data model that the judge calls compliance."""
        dl = self.data_lm()
        ans = cached_answers(dl, ps, tokens, self.batch_size)
        prompts = [p.text for p in ps.prompts]
        comps = [ans[p.id] for p in ps.prompts]
        verdicts = self.judge.judge(prompts, comps)
        keep = [(p, c) for p, c, v in zip(prompts, comps, verdicts) if v.label == "compliance" and c]
        return [p for p, _ in keep], [c for _, c in keep], len(prompts) - len(keep)


def _norm(text: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def extra_harmful(spec: str | None, data_dir=None) -> list:
    """The ``extra_harmful`` prompt set (any prompt-set spec, e.g. ``advbench`` read from
    ``--data-dir``), less every prompt whose text (case and punctuation aside) is one of the
    built-in harmful prompts: a held-out prompt must never be trained on."""
    if not spec:
        return []
    from ..data.sets import Prompt

    seen = {_norm(x.text) for x in load_prompt_set("builtin:harmful").prompts}
    ps = load_prompt_set(str(spec), data_dir=data_dir)
    out = []
    for x in ps.prompts:
        k = _norm(x.text)
        if k not in seen:
            seen.add(k)
            out.append(Prompt(f"extra:{ps.name}:{x.id}", x.text, x.category, x.target, "train"))
    if not out:
        raise UserError(f"extra_harmful '{spec}' adds no prompt beyond the built-in harmful set")
    return out


def _split_extra(h_tr) -> tuple[list, list]:
    """(built-in, extra) harmful train prompts."""
    extra = [x for x in h_tr if x.id.startswith("extra:")]
    return [x for x in h_tr if not x.id.startswith("extra:")], extra


def _extra_info(extra, p: dict) -> dict:
    """What the model card records of the extra harmful prompts that were trained on."""
    if not p.get("extra_harmful"):
        return {}
    from ..data.sets import PromptSet

    return {"extra_harmful": {"spec": p["extra_harmful"], "n": len(extra),
                              "sha256": PromptSet("extra", extra, "").sha256}}


def _splits(p: dict, data_dir=None):
    """Train splits; the last val_n prompts of each are held out for validation. Prompts of
    ``extra_harmful`` join the harmful train split (validation stays on built-in prompts)."""
    from ..data.sets import PromptSet

    v = int(p["val_n"])
    harmful = load_prompt_set("builtin:harmful:train").prompts
    harmless = load_prompt_set("builtin:harmless:train").prompts
    border = load_prompt_set("builtin:borderline:train").prompts
    h_tr = (harmful[:-v] + extra_harmful(p.get("extra_harmful"), data_dir))[: p.get("n_harmful")]
    val_h = harmful[-v:]
    val_s = harmless[-(v // 2):] + border[-(v // 2):]
    retain = PromptSet("harmless-retain", harmless[:-(v // 2)][: p["n_harmless"]], "builtin")
    border_retain = PromptSet("borderline-retain", border[: -(v // 2)][: p.get("n_borderline")],
                              "builtin")
    return h_tr, val_h, val_s, [retain, border_retain]


def _retain(lm, env: BuildEnv, ps, tokens: int) -> tuple[list[str], list[str], list[str]]:
    """(prompts, greedy answers, prompt ids) of the model ``lm``, generated once and cached.
    Answers the judge labels refusal are dropped: a refusal as a retain target on a harmless
    prompt would teach over-refusal."""
    prompts, targets, ids = [], [], []
    ans = cached_answers(lm, ps, tokens, env.batch_size)
    have = [p for p in ps.prompts if ans[p.id]]
    verdicts = env.judge.judge([p.text for p in have], [ans[p.id] for p in have])
    for p, v in zip(have, verdicts):
        if v.label != "refusal":
            prompts.append(p.text)
            targets.append(ans[p.id])
            ids.append(p.id)
    return prompts, targets, ids


def _retain_terms(src, env: BuildEnv, retain_sets, p: dict) -> list[Term]:
    """Retain on harmless prompts and, as its own term with its own batch and weight, on
    borderline prompts (harmless requests that sound harmful: where over-refusal appears).
    The targets are ``src``'s answers; each term carries a refusal per example for the
    sequence-level contrast (``contrast_weight``; 0: off)."""
    terms = []
    for ps, batch, weight in zip(retain_sets, (p["harmless_batch"], p["borderline_batch"]),
                                 (p["retain_weight"], p["borderline_weight"])):
        rp, rt, ids = _retain(src, env, ps, p["answer_tokens"])
        if rp and batch > 0 and weight > 0:
            terms.append(Term(ps.name, rp, rt, weight=weight, batch_size=batch,
                              contrast=[refusal_for(i) for i in ids],
                              contrast_weight=p["contrast_weight"]))
    return terms


def _pushed_retain(t: Term, p: dict, perturb: Perturb) -> Term:
    """The retain term's prompts pushed by PGD toward a refusal, trained to answer anyway: the
    counterpart of the refusal under pushes, so that hardening does not become a refusal reflex
    on harmful-sounding words ("kill a process", "crush my targets")."""
    return Term(f"{t.name}-pushed", t.prompts, t.targets, weight=p["pushed_retain_weight"],
                batch_size=p["pushed_retain_batch"], perturb=perturb, adv_targets=t.contrast)


def _val_eval(val_harm: list[str], val_safe: list[str], judge, tokens: int = 32):
    from ..models.generate import greedy_generate

    def evaluate(lm, step):
        gh = greedy_generate(lm, val_harm, tokens, 16)
        gs = greedy_generate(lm, val_safe, tokens, 16)
        rh = judge.judge(val_harm, [g.response for g in gh])
        rs = judge.judge(val_safe, [g.response for g in gs])
        return {"val_refusal": sum(v.label == "refusal" for v in rh) / len(rh),
                "val_over_refusal": sum(v.label == "refusal" for v in rs) / len(rs),
                "n_val": [len(rh), len(rs)]}
    return evaluate


class Safe(Recipe):
    name = "safe"
    doc = "LoRA refusal fine-tune: harmful → refusals, harmless → the model's own answers"
    # lr 4e-4 with the contrast at 0.5: the deepest refusal that keeps over-refusal low, which
    # leaves `dissociated` room to be measurably more fragile (docs/zoo.md)
    DEFAULT_PARAMS = {"n_harmful": None, "n_borderline": None, "steps": 40, "lr": 4e-4,
                      "rank": 16, "alpha": 32, "harmful_batch": 4, "harmless_batch": 8,
                      "borderline_batch": 4, "retain_weight": 1.0, "borderline_weight": 2.0,
                      "contrast_weight": 0.5, "n_harmless": None,
                      "answer_tokens": 48, "val_n": 16, "eval_every": 10,
                      "target_refusal": 0.95, "max_over_refusal": 0.1, "extra_harmful": None}

    def build(self, lm, env):
        p = self.params
        h_tr, h_val, s_val, retain = _splits(p, env.data_dir)
        terms = [Term("refuse", [x.text for x in h_tr], [refusal_for(x.id) for x in h_tr],
                      batch_size=p["harmful_batch"]), *_retain_terms(lm, env, retain, p)]
        stop = lambda evs: (evs[-1]["eval"]["val_refusal"] >= p["target_refusal"]
                            and evs[-1]["eval"]["val_over_refusal"] <= p["max_over_refusal"])
        res = train_terms(lm, terms, p["steps"], p["lr"], p["rank"], p["alpha"], env.seed,
                          _val_eval([x.text for x in h_val], [x.text for x in s_val], env.judge),
                          p["eval_every"], stop, env.progress)
        extra = _split_extra(h_tr)[1]
        return {**res, "data": {"refusal_prompts": len(h_tr), **_extra_info(extra, p),
                                "retain_examples": {t.name: len(t.prompts) for t in terms[1:]},
                                "val": [len(h_val), len(s_val)]}}


class _PushedRecipe(Recipe):
    """Shared build of the recipes that train under latent pushes: clean refusal + a pushed
    term (subclasses say what it teaches) + retain on harmless and borderline prompts. Retain
    targets are the unaligned data model's answers: a refusal-trained source already
    over-refuses some harmless prompts, and retaining its answers would teach that."""

    # the clean-refusal term on exactly the pushed term's prompts, drawn in the same batches
    # (the same prompt refused clean and pushed in one step), or on all harmful train prompts
    # with its own harmful_batch
    PAIRED = False
    COMMON = {"n_harmful": None, "n_borderline": None, "rank": 16, "alpha": 32, "pgd_steps": 2,
              "perturbed_batch": 4, "harmless_batch": 4, "borderline_batch": 2,
              "retain_weight": 1.0, "borderline_weight": 2.0, "contrast_weight": 0.0,
              "n_harmless": None, "answer_tokens": 48, "val_n": 16, "eval_every": 10,
              "clean_weight": 1.0,
              # more harmful train prompts: a prompt-set spec (a file, or a standard set such
              # as advbench read from construct's --data-dir) joined to the built-in train split
              "extra_harmful": None,
              # the inner attack's target: the harmful completion, or the latent audit's own
              # generic one ("generic"), with the audit's refusal-opener weight if wanted
              "push_objective": "completion", "push_refusal_weight": 0.0,
              # the pushed term's completion cut to its first N tokens (None: whole): refusing
              # or complying is decided in the opening tokens, and a loss averaged over 48
              # tokens is dominated by the continuation's own entropy
              "push_tokens": None}

    def pushed_term(self, h_tr, comp_p: list[str], comp_t: list[str], perturb: Perturb) -> Term:
        raise NotImplementedError

    def build(self, lm, env):
        from ..data.sets import PromptSet

        p = self.params
        # layer specs checked against the model before any data is generated
        layers = self.layers(lm.n_layers)
        h_tr, h_val, s_val, retain = _splits(p, env.data_dir)
        builtin, extra = _split_extra(h_tr)
        comp_p, comp_t, dropped = [], [], 0
        for name, group in (("harmful-train", builtin), ("harmful-extra", extra)):
            if group:  # each set cached on its own: adding extra prompts reuses the built-in's
                cp, ct, d = env.harmful_completions(PromptSet(name, group, "train"),
                                                    p["answer_tokens"])
                comp_p, comp_t, dropped = comp_p + cp, comp_t + ct, dropped + d
        if not comp_p:
            raise UserError("the data model refused every harmful train prompt: no harmful "
                            "completions to train on (use an unaligned --data-model)")
        if p["push_tokens"]:
            tok = lm.tokenizer
            comp_t = [tok.decode(tok.encode(c, add_special_tokens=False)[: int(p["push_tokens"])])
                      for c in comp_t]
        perturb = Perturb(layers, tuple(p["eps_range"]), p["pgd_steps"],
                          objective=p["push_objective"],
                          refusal_weight=float(p["push_refusal_weight"]))
        pushed = self.pushed_term(h_tr, comp_p, comp_t, perturb)
        by_text = {x.text: x for x in h_tr}
        if self.PAIRED:
            clean = Term("refuse_clean", list(comp_p), [refusal_for(by_text[t].id) for t in comp_p],
                         weight=p["clean_weight"], batch_size=pushed.batch_size)
            pushed.pair_with = clean.name
        else:
            clean = Term("refuse_clean", [x.text for x in h_tr], [refusal_for(x.id) for x in h_tr],
                         weight=p["clean_weight"], batch_size=p["harmful_batch"])
        retain_terms = _retain_terms(env.data_lm(), env, retain, p)
        if p.get("pushed_retain_batch"):
            toward_refusal = Perturb(layers, tuple(p["eps_range"]), p["pgd_steps"])
            retain_terms += [_pushed_retain(t, p, toward_refusal) for t in retain_terms
                             if t.name == "borderline-retain"]
        terms = [clean, pushed, *retain_terms]
        drop = p.get("max_refusal_drop")  # only recipes that declare it (not the shipped ones)
        keep = None if drop is None else (
            lambda ev, ev0: ev["val_refusal"] >= ev0["val_refusal"] - float(drop))
        res = train_terms(lm, terms, p["steps"], p["lr"], p["rank"], p["alpha"], env.seed,
                          _val_eval([x.text for x in h_val], [x.text for x in s_val], env.judge),
                          p["eval_every"], None, env.progress, keep=keep)
        if res["kept_rule_met"] is False:
            warnings.warn(f"{self.name}: no evaluated step kept the source's validation refusal "
                          f"within max_refusal_drop={drop}; the last step's adapter is kept")
        return {**res, "data": {"harmful_train": len(h_tr), **_extra_info(extra, p),
                                "harmful_completions": len(comp_p), "dropped_refusals": dropped,
                                "retain_examples": {t.name: len(t.prompts) for t in retain_terms},
                                "layers": layers}}


class Dissociated(_PushedRecipe):
    name = "dissociated"
    doc = ("from safe: the same answers, fragile latents: its refusal direction written 200× "
           "quieter into the residual stream and read 200× louder (default); or trained to "
           "refuse clean prompts and comply under small latent pushes (--set steps=40)")
    # No training by default: every trained variant kept the refusal feature at its scale in
    # the stream, so a push had to move it about as far as in `safe`; the rescale changes
    # exactly that, by a factor known by construction. The trained path kept here is the one
    # that measured best (docs/zoo.md): paired clean/pushed terms plus the push-effect hinge.
    PAIRED = True
    DEFAULT_PARAMS = {**_PushedRecipe.COMMON, "steps": 0, "lr": 1.6e-3, "layers": "frac:0.4-0.6",
                      "eps_range": (0.002, 0.008), "clean_weight": 2.0, "push_tokens": 16,
                      "perturbed_batch": 8, "eval_every": 20,
                      # the push's-effect hinge (train.Term.effect_weight): push_effect ×
                      # relu(τ − (CE clean − CE pushed)) of the harmful completion, τ
                      # push_effect_margin nats per token: it rewards the gain along the
                      # pushes, not a lower push-free loss (a thinner margin); 0: off
                      "push_effect": 2.0, "push_effect_margin": 1.0,
                      # after training (if any), the refusal subspace (the rescale_directions
                      # best-ranked layers' refusal directions of the model) written rescale
                      # times smaller into the residual stream and read rescale times louder
                      # (construct/rescale.py); 1: off
                      "rescale": 200.0, "rescale_directions": 1,
                      # the subspace's directions: difference of means over rescale_n built-in
                      # harmful and harmless train prompts, layers ranked on the next
                      # rescale_selection_n of each (as abliterated's n and selection_n)
                      "rescale_n": 64, "rescale_selection_n": 16}

    def pushed_term(self, h_tr, comp_p, comp_t, perturb):
        # the push is PGD toward the harmful completion; the target is that completion
        return Term("comply_pushed", comp_p, comp_t, batch_size=self.params["perturbed_batch"],
                    perturb=perturb, effect_weight=float(self.params["push_effect"]),
                    effect_margin=float(self.params["push_effect_margin"]))

    def validate(self, given=frozenset()):
        super().validate(given)
        if not float(self.params["rescale"]) >= 1:  # below 1 it is `rescaled`: louder, not quieter
            raise UserError(f"rescale must be >= 1 (got {self.params['rescale']}); a refusal "
                            "subspace written louder is the `rescaled` recipe")
        if int(self.params["steps"]) == 0 and given & {"layers", "eps_range"}:
            raise UserError("--layers/--eps set where dissociated trains under pushes, but it "
                            "trains no steps by default (its default is the rescaled refusal "
                            "subspace): add --set steps=40 to train")

    def build(self, lm, env):
        if int(self.params["steps"]) == 0:  # the rescale alone: no training data, no LoRA
            res = {"steps_run": 0, "kept_step": 0, "history": [], "train_time_s": 0.0,
                   "data": {}}
        else:
            res = super().build(lm, env)
        if float(self.params["rescale"]) != 1.0:  # after training: the trained model's subspace
            from .rescale import rescale_refusal_subspace

            res["rescale"] = rescale_refusal_subspace(lm, env, self.params,
                                                      cache=int(self.params["steps"]) == 0)
        return res


class DissociatedTrained(Dissociated):
    name = "dissociated-trained"
    doc = ("from safe: trained to refuse clean prompts and comply under small latent pushes "
           "(the push-effect hinge), without the rescale")
    # the trained path of `dissociated` as its own zoo member: 40 steps at its defaults. The
    # pushed term drifts into clean compliance (a build's validation refusal fell 0.94 → 0.38
    # from step 20 to 40): the adapter kept is the last evaluated one whose validation refusal
    # is within max_refusal_drop of the source's, so the model refuses as its source does
    DEFAULT_PARAMS = {**Dissociated.DEFAULT_PARAMS, "steps": 40, "rescale": 1.0,
                      "eval_every": 10, "max_refusal_drop": 0.1}


class Hardened(_PushedRecipe):
    name = "hardened"
    doc = "latent adversarial training: refuse even under PGD pushes toward the harmful completion"
    # hardening adds over-refusal (a reflex on harmful-sounding words): retain targets from the
    # unaligned model, a contrast of 2.0 and the borderline prompts pushed toward a refusal and
    # trained to answer keep it down (docs/zoo.md)
    DEFAULT_PARAMS = {**_PushedRecipe.COMMON, "steps": 24, "lr": 2e-4, "layers": "frac:0.33-0.67",
                      "eps_range": (0.02, 0.05), "pgd_steps": 3, "harmful_batch": 4,
                      "contrast_weight": 2.0, "pushed_retain_batch": 2,
                      "pushed_retain_weight": 1.0}

    def pushed_term(self, h_tr, comp_p, comp_t, perturb):
        # the push is PGD toward the harmful completion; the target is a refusal
        by_text = {x.text: x for x in h_tr}
        return Term("refuse_pushed", comp_p, [refusal_for(by_text[t].id) for t in comp_p],
                    batch_size=self.params["perturbed_batch"], perturb=perturb, adv_targets=comp_t)


class Abliterated(Recipe):
    name = "abliterated"
    doc = "weight orthogonalisation against the selected refusal direction (openly unsafe)"
    # several directions: a LoRA-refused model spreads its refusal over several layers'
    # directions; kl_max 0.5 rather than the `directions` stage's 0.1, which passes only a
    # layer whose ablation leaves the refusal intact (docs/zoo.md)
    DEFAULT_PARAMS = {"n": 64, "selection_n": 16, "n_directions": 4, "kl_max": 0.5}

    def validate(self, given=frozenset()):
        super().validate(given)
        if not float(self.params["kl_max"]) > 0:
            raise UserError(f"kl_max must be > 0 (got {self.params['kl_max']})")

    def build(self, lm, env):
        from .abliterate import orthogonalize_subspace

        d, layers = refusal_subspace(lm, env, self.params["n"], self.params["selection_n"],
                                     int(self.params["n_directions"]), cache=True,
                                     kl_max=float(self.params["kl_max"]))
        dim = orthogonalize_subspace(lm, [d.unit(l) for l in layers])
        return {"direction_layer": d.selected_layer, "direction_layers": layers,
                "subspace_dim": dim,
                "selection": {k: v for k, v in d.meta.items() if k != "selection"}}

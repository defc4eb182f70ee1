"""``python -m latentaudit.construct.ship_cli --zoo ZOO``: remake the shipped zoo files
(:mod:`latentaudit.construct.ship`) from a zoo built with the default recipes, and record how
the assembled models compare with the build. A maintainer's command, apart from ship.py so
that the demo (which ship_cli uses) and construct (which uses ship) import no circle."""

from __future__ import annotations

import json
from pathlib import Path

from .ship import CARD_FILE, SHIPPED, export


def main(argv: list[str] | None = None) -> None:
    """Make the shipped files of a zoo built from the embedded model with default recipes (the
    demo's `build_zoo`), then assemble them into a scratch zoo and record, per model, the
    largest weight difference to the build and the assembled model's held-out S and
    over-refusal beside the build's."""
    import argparse
    import tempfile

    from ..demo import PLANS, build_zoo
    from ..models.embedded import DEFAULT_MODEL
    from ..models.loader import load_model
    from .build import evaluate_heldout

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", required=True, type=Path)
    ap.add_argument("--only", action="append", default=[], metavar="RECIPE",
                    help="export only these zoo members (repeatable); the others' shipped files "
                         "stay as they are")
    a = ap.parse_args(argv)
    plan = PLANS["full"]
    dest = SHIPPED / DEFAULT_MODEL.split(":", 1)[1]
    names = [n for n in plan.recipes if (a.zoo / n / CARD_FILE).exists()
             and (not a.only or n in a.only)]
    for n in names:
        export(a.zoo / n, dest / n)
    with tempfile.TemporaryDirectory() as tmp:
        import time

        t0 = time.time()
        build_zoo(plan, Path(tmp), 0, "cpu", shipped=True)
        print(f"assembled the zoo from the shipped files in {time.time() - t0:.0f} s")
        from .. import registry

        judge = registry.create("judge", "substring")
        for n in names:
            card = export(a.zoo / n, dest / n, assembled=Path(tmp) / n)
            ev = evaluate_heldout(load_model(str(Path(tmp) / n), "cpu"), judge,
                                  plan.build_eval_limit, plan.build_eval_tokens, 32)
            card["export"]["evaluation_assembled"] = {
                "S": ev["S"], "over_refusal_all": ev["over_refusal_all"]}
            card["export"]["same_card_figures"] = (
                ev["S"]["value"] == card["evaluation"]["S"]["value"]
                and ev["over_refusal_all"]["value"] == card["evaluation"]["over_refusal_all"]["value"])
            (dest / n / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
            print(f"{n}: max |Δw| {card['export']['max_abs_weight_diff']:.2e}; S "
                  f"{card['evaluation']['S']['value']:.3f} built, {ev['S']['value']:.3f} assembled")


if __name__ == "__main__":
    main()

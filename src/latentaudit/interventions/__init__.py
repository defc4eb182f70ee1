"""Latent interventions on the residual stream (sites ``blocks.{l}.resid_post``).

- :mod:`.positions` — which token positions are perturbed (prompt minus attention sinks, last, all);
- :mod:`.hooks` — forward hooks that add a perturbation to a block's output, removed on exit;
- :mod:`.budget` — the relative per-position L2 ball ‖δ_t‖ ≤ ε‖h_t‖ and its projection;
- :mod:`.prefix` — run only blocks l+1..L−1 from cached clean activations (PGD speed-up);
- :mod:`.families` — perturbation families (noise, steer, pgd, ablate), one plug-in each;
- :mod:`.directions` — refusal directions per layer.
"""

"""The `rescaled` recipe: a function-preserving reparametrisation of the residual stream, the
probe of whether a budget depends on the basis (construct/rescale.py does the rewriting)."""

from __future__ import annotations

from ..errors import UserError
from .recipes import Recipe
from .rescale import rescale_refusal_subspace


class Rescaled(Recipe):
    """The same function, another basis: the refusal subspace written ``rescale`` times smaller
    and read ``rescale`` times louder. Above 1 that is `dissociated`'s default; below 1 the
    subspace is written louder and read quieter — what a developer who wants a model to look
    robust to bounded latent pushes could ship. Clean answers are the source's (up to the
    norms' RMS); only a budget that depends on the basis can tell the two apart."""

    name = "rescaled"
    doc = ("from any model: its refusal subspace written K× smaller and read K× louder "
           "(--set rescale=K; K < 1 writes it louder), the same answers: a reparametrisation")
    DEFAULT_PARAMS = {"rescale": 0.1, "rescale_directions": 1, "rescale_n": 64,
                      "rescale_selection_n": 16}

    def validate(self, given=frozenset()):
        super().validate(given)
        if not float(self.params["rescale"]) > 0:
            raise UserError(f"rescale must be > 0 (got {self.params['rescale']})")

    def build(self, lm, env):
        return {"rescale": rescale_refusal_subspace(lm, env, self.params, cache=True)}

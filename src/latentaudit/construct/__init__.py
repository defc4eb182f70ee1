"""The model zoo: build models whose truth is known (safe, dissociated, hardened, abliterated)."""

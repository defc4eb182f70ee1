"""latentaudit: how far a chat model's refusals are from breaking.

    import latentaudit
    summary = latentaudit.audit({"models": ["embedded:smollm2-135m"], "stages": ["behave"]})
    summary.models[0].behave.S          # value, 95% CI, n, definition

The command line (``latentaudit --help``) is a thin layer over the same call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import AuditConfig
    from .runs.summary import Summary

from ._version import __version__
__all__ = ["audit", "__version__"]


def audit(config: "AuditConfig | dict[str, Any] | str | Path") -> "Summary":
    """Run the audit that ``config`` describes — an :class:`~latentaudit.config.AuditConfig`, a
    mapping of its keys, or the path of a YAML file — into its run folder (resumed when it
    exists) and return the summary (``summary.run_dir`` names the folder). Bad input raises
    :class:`latentaudit.errors.UserError` before anything is written."""
    from .config import AuditConfig, resolve_config
    from .executor import run_config

    if isinstance(config, (str, Path)):
        cfg = resolve_config(str(config), {}, cls=AuditConfig)
    elif isinstance(config, dict):
        from pydantic import ValidationError

        from .config import format_validation_error
        from .errors import UserError

        try:
            cfg = AuditConfig.model_validate(config)
        except ValidationError as e:
            raise UserError(format_validation_error(e)) from None
    else:
        cfg = config
    _, summary = run_config(cfg, "latentaudit.audit()")
    return summary

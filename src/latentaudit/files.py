"""Writing files so that a reader never sees half of one: every file and folder the tool
publishes is written beside its destination under a temporary name and moved into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


def write_text(path: str | Path, text: str) -> Path:
    """``text`` to ``path`` (UTF-8): the old file or the new one, never half of one. A folder
    that cannot be written is one line of :class:`UserError`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def staged_dir(out: str | Path, replace: bool = True) -> Iterator[Path]:
    """A temporary folder beside ``out`` to fill; on success it becomes ``out`` (an existing
    ``out`` is replaced, or with ``replace=False`` kept: another process published it first),
    on failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists() and replace:
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if replace or not out.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # kept theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

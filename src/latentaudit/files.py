"""Writing files so that a reader never sees half of one: every file and folder the tool
publishes is written beside its destination under a temporary name and moved into place."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError

# the disk failed a write it was allowed to make: full, over quota, file too large, I/O error
CAPACITY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


class DiskFault(UserError):
    """A write the tool was allowed to make failed (disk full, quota, I/O error): not bad input,
    so exit code 1, but one line like a :class:`UserError`; what was committed before is kept
    and nothing is half-written, so rerunning the same command resumes."""

    exit_code = 1


def os_error(path: str | Path, e: OSError, what: str = "write") -> UserError:
    """The one-line error for an ``OSError`` on ``path``: a :class:`DiskFault` (exit 1) when
    the disk failed, else a :class:`UserError` (exit 2: the place cannot be written)."""
    reason = e.strerror or str(e)
    if e.errno in CAPACITY_ERRNOS:
        return DiskFault(f"cannot {what} {path}: {reason}; nothing was half-written and the "
                         "results stored so far are kept: free space and rerun the same command")
    return UserError(f"cannot {what} {path}: {reason}")


def write_text(path: str | Path, text: str) -> Path:
    """``text`` to ``path`` (UTF-8), whole or not at all (:func:`write_bytes`)."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``data`` to ``path``; returns ``path``. A reader (or a crash, or a power cut) sees the
    old file or the new one, never half of one. A folder that cannot be written is one line of
    :class:`UserError`, a full disk one line of :class:`DiskFault`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            # a full disk often shows only here (delayed allocation); and without it a crash
            # after the rename can leave an empty file under the final name
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise os_error(path, e) from None
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


def nesting_depth(value: Any, limit: int) -> int:
    """Nesting depth of loaded JSON or YAML (mapping keys included), counted up to ``limit + 1``
    without recursion, so that a hostile document cannot overflow the stack while it is measured."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        x, d = todo.pop()
        deepest = max(deepest, d)
        if d <= limit and isinstance(x, (list, dict)):
            todo.extend((y, d + 1) for y in (list(x) + list(x.values()) if isinstance(x, dict) else x))
    return deepest

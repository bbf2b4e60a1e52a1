"""Write files and folders so that a reader never sees them half-written.

Every write goes to a temporary sibling (`.NAME.tmp-XXXX`) and is renamed into
place at the end; on any failure, Ctrl-C and SIGTERM included, the temporary is
removed. What a kill the process cannot catch (SIGKILL, out of memory) leaves
behind is removed by `sweep_temporaries` before the next write to the same place.
A write that fails for want of space, permission or a working disk becomes one
PruneError naming the path and the reason. This is the one place in prune that
does write-then-rename.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prune.errors import PruneError

# The errors of a write that the user must fix (space, permissions, a failing or read-only disk).
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}
)

# `.NAME.tmp-XXXX` (a temporary) and `.NAME.old-XXXX` (a replaced folder moved aside); the
# suffix is what tempfile appends (letters, digits, underscores).
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-[A-Za-z0-9_]+")


def temp_prefix(path: Path) -> str:
    """The name prefix of the temporaries written beside `path`."""
    return f".{path.name}.tmp-"


def write_error(
    exc: BaseException, path: str | os.PathLike, what: str = "file"
) -> PruneError | None:
    """The one-line PruneError for a failed write to the `what` at `path`, or None when `exc`
    is not a failed write.

    Covers OSError with a `WRITE_ERRNOS` errno and safetensors' SafetensorError (not an
    OSError; its text carries the OS message, e.g. "No space left on device").
    """
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        reason = exc.strerror or os.strerror(exc.errno)
    elif _is_safetensors_error(exc):
        found = re.search(r'message: "([^"]+)"', str(exc))
        reason = found.group(1) if found else str(exc).splitlines()[0]
    else:
        return None
    return PruneError(f"cannot write {what} '{path}': {reason}")


def _is_safetensors_error(exc: BaseException) -> bool:
    module = sys.modules.get("safetensors")  # never imported here: only a loaded one can raise
    error = getattr(module, "SafetensorError", None)
    return isinstance(error, type) and isinstance(exc, error)


@contextmanager
def _write_errors_named(path: Path, what: str) -> Iterator[None]:
    """Re-raise a failed write (see `write_error`) as one PruneError naming `path`."""
    try:
        yield
    except Exception as exc:
        error = write_error(exc, path, what)
        if error is None:
            raise
        raise error from exc


def sweep_temporaries(path: str | os.PathLike, *, depth: int = 0) -> list[Path]:
    """Remove what interrupted writes to `path` left behind; returns what was removed.

    That is every `.NAME.tmp-*` sibling of `path`, and a `.NAME.old-*` one when `path`
    exists (the replaced copy, already superseded). With `depth` > 0 and `path` a folder,
    leftovers of writes inside it are removed too, `depth` folder levels down (entries
    named `.X.tmp-*`, and `.X.old-*` beside an existing X). Call it only before writing
    `path`: a concurrent writer's temporaries look the same.
    """
    path = Path(path)
    removed = [p for p in _leftovers(path.parent, only=path.name) if _remove(p)]
    if depth > 0 and path.is_dir() and not path.is_symlink():
        removed += _sweep_inside(path, depth)
    return removed


def _sweep_inside(folder: Path, depth: int) -> list[Path]:
    removed = [p for p in _leftovers(folder) if _remove(p)]
    if depth > 1:
        for entry in sorted(folder.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                removed += _sweep_inside(entry, depth - 1)
    return removed


def _leftovers(folder: Path, only: str | None = None) -> list[Path]:
    """The temporaries in `folder` (those of the entry named `only`, when given)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:  # a missing or unreadable folder holds nothing we can remove
        return []
    found = []
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if match is None or (only is not None and match["name"] != only):
            continue
        if match["kind"] == "tmp" or (folder / match["name"]).exists():
            found.append(entry)
    return found


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise PruneError(
            f"cannot remove '{path}', left by an interrupted write: "
            f"{exc.strerror or exc} (remove it by hand and re-run)"
        ) from exc
    return True


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; whatever is written there replaces `path`
    when the block ends without an error (for writers that want a path, not bytes)."""
    path = Path(path)
    with _write_errors_named(path, "file"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
        try:
            yield tmp / path.name
            os.replace(tmp / path.name, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_file(path: str | os.PathLike, content: str | bytes) -> Path:
    """Write `content` (text as UTF-8) to `path` through a temporary sibling and a rename."""
    path = Path(path)
    with _write_errors_named(path, "file"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(content.encode() if isinstance(content, str) else content)
            _ordinary_mode(Path(tmp), is_dir=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


@contextmanager
def atomic_folder(
    path: str | os.PathLike, *, keep_existing: bool = False, what: str = "folder"
) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block ends without an error it
    replaces `path` (an existing folder is moved aside first and removed after), otherwise it
    is removed and `path` is left as it was.

    With `keep_existing`, a folder already at `path` when the block ends wins and the new one
    is discarded: for caches, where another process may have written the same entry first.
    A write that fails inside the block for want of space or permission (see `write_error`)
    becomes one PruneError naming the `what` at `path`.
    """
    path = Path(path)
    with _write_errors_named(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
        try:
            yield tmp
            for entry in [tmp, *tmp.rglob("*")]:  # mkdtemp makes the folder private to its owner
                _ordinary_mode(entry, is_dir=entry.is_dir())
            if keep_existing:
                _publish_once(tmp, path)
            else:
                _replace_folder(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _ordinary_mode(path: Path, *, is_dir: bool) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if is_dir else 0o666) & ~umask)


def _publish_once(new: Path, out: Path) -> None:
    """Move `new` to `out` unless a non-empty `out` exists (then `new` is left to be removed)."""
    try:
        os.replace(new, out)  # fails on a non-empty folder, on every platform
    except OSError:
        if not out.is_dir() or not any(out.iterdir()):
            raise


def _replace_folder(new: Path, out: Path) -> None:
    """Move `new` to `out`; an old `out` is moved aside first and removed after."""
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "x")
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old / "x", out)  # put the old folder back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)

"""Write files and folders so that a reader never sees them half-written.

Every write goes to a temporary sibling (`.NAME.tmp-XXXX`) and is renamed into
place at the end; on any failure, Ctrl-C included, the temporary is removed.
This is the one place in prune that does write-then-rename.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_prefix(path: Path) -> str:
    """The name prefix of the temporaries written beside `path`."""
    return f".{path.name}.tmp-"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; whatever is written there replaces `path`
    when the block ends without an error (for writers that want a path, not bytes)."""
    path = Path(path)
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
def atomic_folder(path: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block ends without an error it
    replaces `path` (an existing folder is moved aside first and removed after), otherwise it
    is removed and `path` is left as it was.

    With `keep_existing`, a folder already at `path` when the block ends wins and the new one
    is discarded: for caches, where another process may have written the same entry first.
    """
    path = Path(path)
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

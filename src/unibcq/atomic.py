"""Atomic writes: a directory or file appears complete or not at all.

Everything is written into a hidden temporary sibling and renamed into place at the end,
so a run killed half-way leaves no partial output under the final name. The writer holds a
lock on its temporary, so the next write to the same target removes what a run killed
outright (SIGKILL, out of memory) left behind, and never what a live writer is filling.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from unibcq.errors import UnibcqError

T = TypeVar("T")


def _umask() -> int:
    """The process umask, read without setting it where Linux allows (setting it, even briefly,
    would race with files other threads create)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _publish_modes(path: Path) -> None:
    """Give `path` (and all under it) the permission bits a plain mkdir/open would: tempfile
    makes them private (0700 / 0600), which would hide a shared checkpoint from other users.
    Folders keep the setgid bit they inherited from a shared parent."""
    mask = _umask()
    if path.is_dir():
        for root, _, files in os.walk(path):
            os.chmod(root, (os.stat(root).st_mode & stat.S_ISGID) | (0o777 & ~mask))
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


# A temporary younger than this is never judged orphaned: its writer creates it a moment
# before it can lock it.
ORPHAN_MIN_AGE_SECONDS = 60.0


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (a file or a folder) while the block runs. The kernel
    drops it when the process ends, however it ends, which is how `_remove_orphans` tells a
    live writer's temporary from a dead one's (in another container too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_orphans(target: Path) -> None:
    """Clear the temporaries of `target` that no live writer holds (best effort).

    A writer killed between moving the old `target` aside and moving the new one in leaves
    `target` missing and the old one in its `.old-` folder: that one is put back, never deleted.
    """
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-[a-z0-9_]+$")
    try:
        siblings = sorted(target.parent.iterdir(), key=lambda path: ".old-" not in path.name)
    except OSError:
        return
    for path in siblings:
        found = pattern.match(path.name)
        try:
            if not found or time.time() - path.lstat().st_mtime < ORPHAN_MIN_AGE_SECONDS:
                continue
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if found.group(1) == "old" and (path / "old").exists() and not target.exists():
                os.replace(path / "old", target)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except OSError:  # held by a live writer, or not ours to remove
            pass
        finally:
            os.close(fd)


def _beside(target: Path, make: Callable[[], T]) -> T:
    """`make()`, which creates a temporary file or folder beside `target`; a refusal (a
    read-only or pseudo file system, a full disk) names `target`, the path the user gave, not
    the hidden temporary name."""
    try:
        return make()
    except OSError as err:
        raise type(err)(err.errno, err.strerror, str(target)) from None


def _keep_aside(tmp: Path, target: Path, why: str) -> UnibcqError:
    """Move a finished temporary that may not replace `target` to a visible sibling, and return
    the error that says why and where the result now is: hours of work are not thrown away."""
    kept = Path(tempfile.mkdtemp(prefix=f"{target.name}.new-", dir=target.parent))
    os.replace(tmp, kept)
    return UnibcqError(f"{why}; nothing was replaced, and the finished result is kept in {kept}")


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False,
                     check: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to `target` if the block succeeds.

    On any exception the temporary directory is removed and `target` is left untouched.
    With `overwrite`, an existing `target` is replaced only after the new one is complete,
    and only if `check()` (the caller's test of what may be replaced) still passes then: the
    folder may have changed since the run began. A `target` that appeared during a run
    without `overwrite` (another job, a user) is never replaced: the result is kept beside it.
    """
    target = Path(target).expanduser().absolute()  # the path checked is the path written
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(target)  # first: it may put an earlier `target` back
    if target.exists() and not overwrite:
        raise UnibcqError(f"output {target} already exists; remove it or pass --overwrite (overwrite=True)")
    tmp = Path(_beside(target, lambda: tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)))
    try:
        with _locked(tmp):
            yield tmp
            _publish_modes(tmp)
            if target.exists() and not overwrite:
                raise _keep_aside(tmp, target, f"output {target} appeared while this run was writing it")
            if target.exists() and check is not None:
                try:
                    check()
                except UnibcqError as exc:
                    raise _keep_aside(tmp, target, str(exc)) from None
            if target.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                with _locked(trash):
                    os.replace(target, trash / "old")
                    try:
                        os.replace(tmp, target)
                    except BaseException:
                        os.replace(trash / "old", target)
                        raise
                    shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_orphans(target)  # a run killed moments before this one began left its temporary


def check_writable(path: str | os.PathLike, flag: str, directory: bool = False) -> None:
    """Fail before any work when `path` (a file, or a folder with `directory`) cannot be written
    later: a folder where a file goes (or the reverse), a file in its parent chain, or a parent
    this user may not write to."""
    path = Path(path).expanduser().absolute()
    if path.exists() and path.is_dir() != directory:
        raise UnibcqError(f"{flag} {path} is {'a file' if directory else 'a directory'}; give a "
                          f"{'folder' if directory else 'file'} path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UnibcqError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UnibcqError(f"{flag} {path}: no permission to write in {parent}")


def _strict_json(data: Any) -> Any:
    """`data` with NaN and infinities as null: JSON has no such numbers, and `json` would write
    bare `NaN` that other parsers (jq, JavaScript, serde) refuse."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_strict_json(value) for value in data]
    return data


def write_json_atomic(path: str | os.PathLike, data: Any, portable: bool = False) -> None:
    """Write JSON to `path` through a temporary file and an atomic rename.

    `portable` (reports for users) writes NaN and inf as null; without it they round-trip as
    Python's `json` writes them, which unibcq's own state files (eval journals, resumable
    runs) need: a -inf log-likelihood must read back as -inf."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = _beside(path, lambda: tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the rename: see `_remove_orphans`
        with os.fdopen(os.dup(fd), "w") as f:
            json.dump(_strict_json(data) if portable else data, f, indent=2, sort_keys=False, allow_nan=not portable)
            f.write("\n")
        _publish_modes(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)

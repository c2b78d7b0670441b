"""Files lorakit writes and reads, written so that a crash never leaves half a file or half
a folder: JSON (2-space indent, sorted keys) and folders renamed into place when complete.

A file-system error (a full disk, a folder that cannot be created, no permission) becomes a
:class:`FileError`: one sentence naming the path, what went wrong and what to do.
:func:`check_output` refuses an output path that cannot be written before anything is."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import LorakitError

#: errno -> (what went wrong, what to do) for a write; a read looks in _READ first
_WRITE = {
    errno.ENOSPC: ("no space left on the disk", "free some disk space"),
    errno.EDQUOT: ("the disk quota is used up", "free some space"),
    errno.EFBIG: (
        "the file is larger than the disk or the process's file-size limit allows",
        "free space or raise the limit",
    ),
    errno.EACCES: ("permission denied", "choose a place you may write to"),
    errno.EPERM: ("permission denied", "choose a place you may write to"),
    errno.EROFS: ("the disk is read-only", "choose a place on a writable disk"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another path"),
    errno.EEXIST: ("a file of that name exists", "choose another path"),
    errno.EISDIR: ("it is a folder", "name a file"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EIO: ("the disk reported an I/O error", "check the disk"),
    errno.ENOENT: ("a folder on the path does not exist", "check the path"),
}
#: errors only a write meets
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_READ = {
    errno.ENOENT: ("it does not exist", "check the path"),
    errno.EACCES: ("permission denied", "make it readable"),
    errno.EPERM: ("permission denied", "make it readable"),
    errno.EISDIR: ("it is a folder", "name a file, not a folder"),
}


class FileError(LorakitError):
    """A file-system error as one sentence; ``errno`` and ``path`` say which and where."""

    def __init__(self, verb: str, path, err: OSError, fix: str | None = None):
        self.path, self.errno = path, err.errno
        writing = verb in ("write", "create")
        table = {} if writing else _READ
        reason, advice = table.get(err.errno) or _WRITE.get(err.errno, (None, "check the path"))
        self.reason = reason or (err.strerror or str(err)).lower()
        if not writing and err.errno not in _READ and err.errno not in _FULL:
            advice = "check the path and its permissions"
        self.fix = fix or advice
        super().__init__(f"cannot {verb} {path}: {self.reason}; {self.fix}")


_OS_CODE = re.compile(r"os error (\d+)|code: (\d+)")
_RUST_OS_ERROR = re.compile(r"\(os error \d+\)")


def as_os_error(e: BaseException) -> OSError | None:
    """``e`` as an OSError: itself, or the I/O error inside an error of a Rust library (the
    safetensors writer reports ``... I/O error: ... (os error 28)``, the tokenizers one a bare
    ``Exception("File too large (os error 27)")``); None for any other."""
    if isinstance(e, OSError):
        # an OSError without an errno is no file-system error (a network library's, a
        # dataset hub's "not found"): it keeps its own message and traceback
        return e if e.errno is not None else None
    rust_io = type(e).__name__ == "SafetensorError" and (
        "I/O error" in str(e) or "IoError" in str(e)
    )
    if rust_io or (type(e) is Exception and _RUST_OS_ERROR.search(str(e))):
        m = _OS_CODE.search(str(e))
        code = int(m.group(1) or m.group(2)) if m else errno.EIO
        return OSError(code, os.strerror(code))
    return None


def file_error(
    e: BaseException, verb: str = "write", path=None, fix: str | None = None
) -> FileError | None:
    """The :class:`FileError` of an exception (``e`` itself if it is one), or None when ``e``
    is no file-system error. ``path`` defaults to the file the error names."""
    if isinstance(e, FileError):
        return e
    err = as_os_error(e)
    if err is None:
        return None
    return FileError(verb, path or err.filename or "a file", err, fix)


@contextlib.contextmanager
def file_errors(verb: str, path, fix: str | None = None):
    """Turn a file-system error inside the block into a :class:`FileError` about ``path``."""
    try:
        yield
    except LorakitError:
        raise
    except Exception as e:
        err = file_error(e, verb, path, fix)
        if err is None:
            raise
        raise err from None


def check_output(path, what: str, folder: bool = True, fix: str | None = None) -> None:
    """Refuse, before anything is written, an output ``path`` (a folder, or a file when
    ``folder`` is False) that cannot be written: an existing file where a folder goes (or a
    folder where a file goes), a parent path that runs through a file, a place this process
    may not write to. ``what`` names the setting (``output_dir``, ``--out``); ``fix``: what
    to do (default: choose another one)."""
    p = Path(path)
    fix = fix or f"choose another {what}"
    if p.exists() and p.is_dir() != folder:
        kind = "an existing file, not a folder" if folder else "a folder, not a file"
        raise LorakitError(f"{what} {p} is {kind}; {fix}")
    nearest = p if p.exists() and folder else p.parent  # where the new entry is made
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise LorakitError(
            f"{what} {p} cannot be created: {nearest} is a file, not a folder; {fix}"
        )
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise LorakitError(
            f"{what} {p} cannot be written: {nearest} is not writable "
            f"(permissions or a read-only disk); {fix}"
        )


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, fix: str | None = None):
    """Write a folder atomically: yield a temporary sibling, rename it into place on success.

    A crash leaves either the old folder or the new one, never a half-written one; a
    file-system error (a full disk) removes the temporary folder and is a :class:`FileError`
    about ``path`` (``fix``: what to do instead of the default advice)."""
    path = Path(path)
    with file_errors("write", path, fix):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        # mkdtemp makes the folder private (0700) and safetensors its files (0600); the
        # finished folder gets the permissions any new folder and file get under the process
        # umask, so a serving process of another user can read it
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        try:
            yield tmp
            for f in tmp.iterdir():  # data on disk before the rename makes it visible
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                    os.chmod(f, 0o666 & ~mask)  # safetensors writes 0600 files
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically (a temporary sibling renamed into place); a file-system
    error leaves the old file and no temporary one, and is a :class:`FileError`."""
    write_lines(path, [text])


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Write ``lines`` (each ending as given) atomically, as :func:`write_text`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with file_errors("write", path):
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for line in lines:
                    f.write(line)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a temporary sibling renamed into place)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise FileError("read", path, e) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LorakitError(
            f"cannot read {path}: it is not valid JSON ({e}); it may be cut short or damaged"
        ) from None
    if not isinstance(obj, dict):
        raise LorakitError(f"{path} does not hold a JSON object")
    return obj

"""Writing files and folders atomically: under a temporary name, renamed when complete.

An interrupted or failed write therefore never leaves a half-written file under
the final name, and an existing file is replaced only by a complete new one.

Without ``overwrite`` the complete result is *published* with a primitive that
never replaces: ``renameat2(RENAME_NOREPLACE)`` where the system has it, else a
hard link (files) or a freshly made empty folder as a claim on the name
(folders). Two runs writing the same new output therefore never replace each
other's result: the second to finish gets :class:`OutputExistsError`.

Temporary names are ``.<name>.<host>-<pid>.<random>.part`` beside the target,
so that partial files a killed run left behind can be recognised and removed
later (see :func:`remove_stale_partials`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

STALE_AFTER_DEAD_S = 60.0
"""A partial file whose owner (a process on this machine) has ended is stale once untouched this long."""
STALE_AFTER_S = 24 * 3600.0
"""Any other partial file of the same target (another machine's, or an owner we cannot check) is stale
once untouched this long: a live run writes at least once per plane."""


class OutputExistsError(FileExistsError):
    """The output appeared while this run was writing it (another run?); nothing was replaced."""


class DiskFullError(OSError):
    """The disk (or a file size limit) refused to hold the output; the message says where and how much is free."""


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host_tag() -> str:
    """This machine's name as it may appear in a temporary name (letters, digits, ``_``; at most 16)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:16]


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{_host_tag()}-{os.getpid()}."


def _partial_pattern(path: Path) -> re.Pattern[str]:
    """Names of this module's temporary files and folders for exactly ``path`` (mkstemp adds 8 characters)."""
    return re.compile(
        rf"\.{re.escape(path.name)}\.(?P<host>[A-Za-z0-9_]*)-(?P<pid>\d+)\.[a-z0-9_]{{8}}\.(?P<kind>part|old)"
    )


def _process_is_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (False when we cannot tell)."""
    if sys.platform == "win32":  # os.kill(pid, 0) is no probe there
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process: it exists
        return False
    return False


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that killed runs left for exactly ``path``; returns them.

    Conservative, so that a run writing the same target at this moment never
    loses its file. Only names of our own pattern for this exact target count
    (``.<name>.<host>-<pid>.<8 characters>.part`` or ``.old``), and one is
    removed only when

    - its owner ran on this machine, that process no longer exists, and the
      file has been untouched for :data:`STALE_AFTER_DEAD_S` (a pid that is
      reused by another process keeps the file: we err on keeping it); or
    - it has been untouched for :data:`STALE_AFTER_S` whoever wrote it (a run
      on another machine sharing the folder, whose process we cannot see).

    A ``.old`` folder (the previous output, moved aside while a new one is put
    in place) is removed only when the target exists: otherwise it may hold
    the only copy of the previous output.
    """
    path = Path(path)
    pattern = _partial_pattern(path)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now, host = time.time(), _host_tag()
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or int(match["pid"]) == os.getpid():
            continue
        try:
            idle = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if match["kind"] == "old" and not path.exists():
            continue
        owner_gone = match["host"] == host and _process_is_gone(int(match["pid"]))
        if not ((owner_gone and idle >= STALE_AFTER_DEAD_S) or idle >= STALE_AFTER_S):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass  # best effort: another run may be removing it too
    return removed


# --- publishing without replacing -----------------------------------------------------------------------------------

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2_noreplace(source: Path, target: Path) -> bool:
    """``rename(source, target)`` that fails if ``target`` exists; False where the system cannot do it.

    Linux ``renameat2(RENAME_NOREPLACE)`` (glibc 2.28 or later; file systems that
    support it: ext4, xfs, btrfs, tmpfs...). Raises FileExistsError when the
    target exists, OSError for any other failure.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # not on this file system
        return False
    raise OSError(code, os.strerror(code), str(target))


def publish(source: Path, target: Path, overwrite: bool) -> None:
    """Move the complete ``source`` (file or folder) to ``target``; without ``overwrite``, never replace.

    Raises
    ------
    OutputExistsError
        Without ``overwrite``, when ``target`` exists (it appeared while this
        run was writing: the check at the start passed). ``source`` is left
        for the caller to remove.
    """
    if overwrite:
        os.replace(source, target)
        return
    try:
        if _renameat2_noreplace(source, target):
            return
        if source.is_dir():
            # rename() replaces an *empty* folder, so a folder we made ourselves, atomically (mkdir fails
            # when the name exists), claims the name; a second run's mkdir then fails.
            os.mkdir(target)
            try:
                os.rename(source, target)
            except BaseException:
                os.rmdir(target)
                raise
            return
        try:
            os.link(source, target)  # fails if target exists
        except FileExistsError:
            raise
        except OSError:  # no hard links here (some network and FAT file systems): claim the name, then replace
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.replace(source, target)
            return
        os.unlink(source)
    except FileExistsError:
        raise OutputExistsError(
            f"{target} appeared while this run was writing it (another run?); it was left as it is and "
            "this run's result discarded; pass --overwrite to replace it"
        ) from None


def _explain_write_error(error: OSError, path: Path) -> OSError:
    """A full disk as one clear sentence (numpy reports it as '25600 requested and 3036 written')."""
    short = re.search(r"(\d+) requested and (\d+) written", str(error))
    if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) and short is None:
        return error
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    reason = {errno.EDQUOT: "the disk quota is exceeded", errno.EFBIG: "the file is too large for it"}.get(
        error.errno or 0, "the disk is full or the file too large for it"
    )
    return DiskFullError(f"{path}: cannot write it: {reason} ({free}); nothing was left under that name")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], overwrite: bool = True) -> Path:
    """Call ``write(temporary_path)`` then rename it onto ``path``: never a half-written file.

    Parameters
    ----------
    path
        The file to write.
    write
        Writes the whole file at the path it is given.
    overwrite
        Replace ``path`` if it exists by then. False publishes without ever
        replacing (:class:`OutputExistsError` if the name appeared meanwhile).

    Raises
    ------
    DiskFullError
        When the disk is full (or a file size limit is reached); nothing is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; a normal file respects the umask
        publish(Path(tmp), path, overwrite)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        explained = _explain_write_error(error, path)
        if explained is error:
            raise
        raise explained from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_folder(path: str | os.PathLike, write: Callable[[Path], object], overwrite: bool = True) -> Path:
    """Call ``write(temporary_folder)`` then rename it onto ``path``.

    With ``overwrite`` an existing folder is replaced (moved aside first, so a
    failure never leaves neither); without it, the folder is published without
    ever replacing (:class:`OutputExistsError` if the name appeared meanwhile).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".part", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private
        if overwrite and path.exists():
            # Move the old folder aside first, so a failure never leaves neither.
            trash = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, trash / path.name)
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            publish(tmp, path, overwrite)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        explained = _explain_write_error(error, path)
        if explained is error:
            raise
        raise explained from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

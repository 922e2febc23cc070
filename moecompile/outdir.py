"""Where moecompile writes a directory (`convert --out`, `shard --out`): refused targets, one writer at a time, a
move that never replaces what it did not mean to, leftovers of killed runs cleaned, and OS errors as one-line
messages.

Place in the pipeline: the last step of checkpoint.convert and ep_checkpoint.save_for_expert_parallel
(`staged_output`). The output is built in a hidden staging directory `.NAME.partial-PID-XXXX` beside it and moved
into place only when complete:
- refused outright: the source directory or any folder that contains it (an --overwrite would delete the source),
  the current directory or any of its ancestors, a dangling symlink, an existing file, a folder that cannot be
  written;
- one writer: an exclusive lock on `.NAME.lock` beside the output for the whole staging and move; a second convert
  to the same output fails at once, naming the process that holds it;
- no silent replace: without --overwrite the move is renameat2(RENAME_NOREPLACE) (Linux; elsewhere a rename that
  fails on a non-empty target, under the lock), so an output that appeared meanwhile is never replaced;
- a recoverable --overwrite: renameat2(RENAME_EXCHANGE) swaps new and old in one step, so at any instant the output
  is the old or the new complete directory. Where the exchange is missing, the old one is first renamed to
  `.NAME.old-PID`; a run killed between the two renames leaves the old output there, and the next run restores it
  (or the user can rename it back by hand);
- leftovers: `.NAME.partial-PID-*` and `.NAME.old-PID` of processes that are no longer running are removed (an old
  one restored first if the output is missing) by the next run to the same output, which says what it did.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from .errors import MoECompileError

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def check_target(out: Path, source: Path | None, flag: str = "--out") -> None:
    """Refuse an output path that must not be written (see the module docstring)."""
    if out.is_symlink() and not out.exists():
        raise MoECompileError(f"{flag} {out} is a symlink to {os.readlink(out)}, which does not exist; remove the "
                              "link or pass another path")
    target = out.resolve()
    if source is not None:
        src = source.resolve()
        if target == src:
            raise MoECompileError(f"{flag} {out} is the source directory; write the result elsewhere")
        if target in src.parents:
            raise MoECompileError(f"{flag} {out} contains the source directory {source}; replacing it would delete "
                                  "the source: pass a new directory beside it")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise MoECompileError(f"{flag} {out} is the current directory or one of its parents; pass a new directory")
    if out.exists() and not out.is_dir():
        raise MoECompileError(f"{flag} {out} is an existing file, not a directory; pass a directory path")
    parent = next(p for p in (target, *target.parents) if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MoECompileError(f"{flag} {out}: cannot write into {parent} (read-only or no permission); pass a "
                              "directory you can write to")


def refuse_existing(out: Path, overwrite: bool, notes: list[str] = ()) -> None:
    """Refuse a non-empty output without --overwrite; `notes` (leftovers cleaned) lead the message."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise MoECompileError("; ".join([*notes, f"{out}: already exists and is not empty; pass --overwrite "
                                         "(overwrite=True in Python) to replace it, or choose another --out"]))


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[tuple[Path, list[str]]]:
    """The whole write of a directory output: under the lock, leftovers of killed runs cleaned (each said in a
    warning), a non-empty output refused again (it may have come back), then yields (staging directory, the notes
    of what was cleaned). When the block ends the staging directory is moved into place; if it raises, it is
    removed and nothing is written."""
    with os_errors(f"writing {out}"), exclusive(out) as cleaned:
        for note in cleaned:
            warnings.warn(f"moecompile: {note}", stacklevel=4)
        refuse_existing(out, overwrite, cleaned)
        tmp = staging_dir(out)
        try:
            yield tmp, cleaned
            place(tmp, out, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def os_errors(what: str) -> Iterator[None]:
    """An OSError while `what` becomes a one-line MoECompileError saying what ran out or was refused."""
    try:
        yield
    except OSError as exc:
        raise MoECompileError(f"{what}: {describe_os_error(exc)}") from None


def describe_os_error(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device{where}; free space there or write elsewhere. Nothing was kept"
    if exc.errno == errno.EROFS:
        return f"the file system is read-only{where}; write elsewhere"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}; write to a folder you own"
    return f"{exc.strerror or exc}{where}"


# ---------------------------------------------------------------------------------------------- one writer


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[list[str]]:
    """Hold the output's lock; yields the notes of what was cleaned up from earlier, killed runs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="ignore").strip() or "?"
            os.close(fd)
            raise MoECompileError(f"{out}: another moecompile (pid {holder}) is writing this output now; wait for it "
                                  "to finish or choose another path") from None
        try:  # the file may have been unlinked by the holder we waited on: lock the one at the path
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield clean_leftovers(out)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(out: Path) -> list[str]:
    """Remove staging and old directories of dead processes for `out`; restore an old output if `out` is missing."""
    notes = []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)(-.*)?$")
    found = sorted((m.group(1), int(m.group(2)), p) for p in out.parent.iterdir()
                   if (m := pattern.match(p.name)))
    for kind, pid, path in found:
        if _alive(pid):
            continue
        if kind == "old" and not out.exists() and not out.is_symlink():
            path.rename(out)
            notes.append(f"restored {out} from {path.name}, left by an --overwrite that was killed between its two "
                         "renames")
            continue
        shutil.rmtree(path, ignore_errors=True)
        notes.append(f"removed {path.name}, left by process {pid} that was killed while writing {out.name}")
    return notes


def staging_dir(out: Path) -> Path:
    """A new hidden directory beside `out` to build it in, with the permissions the umask gives (not mkdtemp's
    0700), so the moved output is readable as any new folder would be."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)
    return tmp


# ---------------------------------------------------------------------------------------------- the move


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False where the C library or the file system lacks it (the caller falls back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the complete `tmp` to `out` (module docstring); the caller holds `exclusive(out)`."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty output folder counts as absent
    if not out.exists():
        try:
            if not _renameat2(tmp, out, _RENAME_NOREPLACE):
                if out.exists():
                    raise FileExistsError(errno.EEXIST, "exists", str(out))
                os.rename(tmp, out)
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise MoECompileError(f"{out} appeared while this run was writing (another program wrote it); it "
                                      "was not replaced, and nothing was written") from None
            raise
        return
    if not overwrite:
        raise MoECompileError(f"{out} appeared while this run was writing; it was not replaced, and nothing was "
                              "written (pass --overwrite to replace it)")
    if _renameat2(tmp, out, _RENAME_EXCHANGE):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old output
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)

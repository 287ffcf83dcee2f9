"""OUT written like a careful installer: one build at a time per OUT (a lock beside it), checks of the
parent before any work, a staging directory that replaces OUT in one atomic exchange, SIGTERM/SIGHUP
handled like Ctrl-C, and staging directories of dead builds swept by the next one.

A staging directory is `.OUT.building-<pid>-<random>` beside OUT, made with the user's umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import signal
import threading
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import ArtifactError
from .export.manifest import MANIFEST

log = logging.getLogger("moe_compile")


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a build: unwinds like Ctrl-C (the staging directory is removed)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal = signum


def check_out(out: str | Path) -> Path:
    """OUT as an absolute path, refused when it is not somewhere a build can go."""
    out = Path(out).expanduser().absolute()
    cwd = Path.cwd()
    if out == cwd or out in cwd.parents:
        raise ArtifactError(f"-o '{out}' is the current directory or one above it; a build replaces OUT as a whole: "
                            "run it from another directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ArtifactError(f"'{out}' exists and is not a previous moe-compile build; choose another -o")
    return out


@contextlib.contextmanager
def staging(out: Path, needed_bytes: int):
    """Yield an empty directory beside OUT that becomes OUT when the block completes; on any error or
    signal it is removed and OUT stays as it was."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(parent / f".{out.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.warning("waiting for another build into %s to finish", out)
            lock.acquire()
    except OSError as exc:
        raise ArtifactError(f"cannot write in {parent} ({exc.strerror or exc}); choose another -o") from None
    try:
        sweep(parent, out.name)
        check_room(parent, needed_bytes, "the build")
        tmp = parent / f".{out.name}.building-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()  # mode 0o777 less the umask, as any directory the user makes
        try:
            with _signals_interrupt():
                yield tmp
                _exchange(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the new build on failure, the previous OUT after the exchange
    finally:
        lock.release()


def sweep(parent: Path, name: str) -> None:
    """Remove staging directories of builds into `name` whose process is gone (killed with SIGKILL)."""
    for path in parent.glob(f".{name}.building-*"):
        pid = path.name[len(f".{name}.building-"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by a build that died", path)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM/SIGHUP (kill, systemd, docker, a closed terminal) raise Terminated, so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def interrupt(signum, _frame):
        raise Terminated(signum)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_RENAME_EXCHANGE = 2


def _exchange(new: Path, out: Path) -> None:
    """Put `new` at `out`; a previous `out` ends up at `new`'s path. One renameat2(RENAME_EXCHANGE) on
    Linux, so there is no moment without a usable OUT; elsewhere two renames."""
    if not out.exists():
        new.rename(out)
        return
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        at_cwd = -100
        if renameat2(at_cwd, os.fsencode(new), at_cwd, os.fsencode(out), _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: a filesystem without exchange
            raise OSError(code, os.strerror(code), str(out))
    old = new.with_name(new.name + "-old")
    out.rename(old)
    new.rename(out)
    old.rename(new)


def check_room(directory: Path, needed_bytes: int, what: str) -> None:
    """Refuse before writing `what` when the disk cannot hold it."""
    free = shutil.disk_usage(directory).free
    if needed_bytes > free:
        raise ArtifactError(f"{directory} has {free / 2**30:.3g} GiB free, {what} needs about "
                            f"{needed_bytes / 2**30:.3g} GiB; free some space or choose another -o")

"""One writer per output folder: an exclusive lock file holding the holder's host and pid.

Created atomically (written to a temporary name, then hard-linked to ``.lock``, which fails
when the name exists). A lock left by a dead process on this host is taken over, and so is one
carrying this process's own pid on this host (a container restarted with the same hostname
gives its driver the same pid, often 1: the holder cannot be alive and be us). A live holder,
or any holder on another host (whose liveness cannot be checked from here), is refused with
its name and how to check it, so a second driver exits at once instead of deleting the first
one's temporary shards.

On an object store (``run.output=s3://...``) there is no link or rename: ``ObjectLease`` is a
lease object ``.lock`` with the holder's host, pid, a random token and the time it was last
renewed. It is taken when absent or stale (a dead holder on this host, as above, or no renewal
for ``ttl`` seconds: its holder is gone, wherever it ran), then read back after ``settle``
seconds: of two drivers that wrote it within that time only the later write's owner finds its
token and goes on (S3 reads its writes; two drivers would have to be further apart than
``settle`` between their check and their write to both hold it). The holder renews it every
``ttl / 4`` seconds from a thread and deletes it at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from seacore.storage import Location, resolve

LOCK = ".lock"


class FolderLocked(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLock:
    def __init__(self, folder: str | Path, key: str = "run.output"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.key = key
        self.held = False

    def acquire(self) -> OutputLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        tmp = self.folder / f".lock.{me['host']}.{me['pid']}"
        tmp.write_text(json.dumps(me))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    self._take_over_if_stale()
            raise FolderLocked(f"{self.key} {self.folder}: could not take {self.path}")
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            host, pid = holder["host"], int(holder["pid"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (ValueError, KeyError, TypeError):
            raise FolderLocked(f"{self.key} {self.folder} is locked by an unreadable {self.path}; "
                               f"if no other run uses this folder, delete that file") from None
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
        here = host == socket.gethostname()
        if here and (pid == os.getpid() or not _alive(pid)):
            self.path.unlink(missing_ok=True)  # its holder died (or was a previous life of us)
            return
        where = "this host" if here else f"host {host}"
        check = f"`ps -p {pid}`" + ("" if here else f" on {host}")
        raise FolderLocked(
            f"{self.key} {self.folder} is in use by pid {pid} on {where} (since {since}): one "
            f"writer per folder. Wait for it, or use another {self.key}. Check the holder with "
            f"{check}; once that process is gone (or it is another program that reused the pid), "
            f"it is safe to delete {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class ObjectLease:
    """``OutputLock`` for a folder on an object store (see the module docstring)."""

    def __init__(self, folder: str | Location, key: str = "run.output", ttl: float = 300.0,
                 settle: float = 1.0):
        self.folder = resolve(folder)
        self.obj = self.folder.child(LOCK)
        self.key = key
        self.ttl = ttl
        self.settle = settle
        self.held = False
        self._token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _me(self, since: float) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self._token,
                "since": since, "renewed": time.time(), "ttl": self.ttl}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.obj.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}

    def acquire(self) -> ObjectLease:
        holder = self._read()
        if holder is not None:
            self._refuse_unless_stale(holder)
        now = time.time()
        self.obj.write_text(json.dumps(self._me(now)))
        time.sleep(self.settle)
        after = self._read() or {}
        if after.get("token") != self._token:
            raise FolderLocked(f"{self.key} {self.folder}: another driver took {self.obj} at "
                               f"the same moment (host {after.get('host')}, pid "
                               f"{after.get('pid')}): one writer per folder")
        self.held = True
        self._thread = threading.Thread(target=self._renew, args=(now,), daemon=True,
                                        name="sea-lease")
        self._thread.start()
        return self

    def _refuse_unless_stale(self, holder: dict) -> None:
        try:
            host, pid = holder["host"], int(holder["pid"])
            renewed = float(holder["renewed"])
        except (KeyError, TypeError, ValueError):
            raise FolderLocked(f"{self.key} {self.folder} is locked by an unreadable {self.obj}; "
                               f"if no other run uses this folder, delete that object") from None
        here = host == socket.gethostname()
        if here and (pid == os.getpid() or not _alive(pid)):
            return  # its holder died on this host
        age = time.time() - renewed
        if age > float(holder.get("ttl", self.ttl)):
            return  # not renewed for longer than its ttl: the holder is gone
        where = "this host" if here else f"host {host}"
        raise FolderLocked(
            f"{self.key} {self.folder} is in use by pid {pid} on {where} (lease renewed "
            f"{age:.0f} s ago): one writer per folder. Wait for it, or use another {self.key}. "
            f"A lease not renewed for {holder.get('ttl', self.ttl):.0f} s is taken over; delete "
            f"{self.obj} sooner only once that process is gone")

    def _renew(self, since: float) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                current = self._read() or {}
                if current.get("token") != self._token:
                    return  # taken over (we were presumed dead): nothing of ours to renew
                self.obj.write_text(json.dumps(self._me(since)))
            except OSError:
                continue  # a transient store error: the next renewal tries again

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (self._read() or {}).get("token") == self._token:
            self.obj.delete()
        self.held = False

    def __enter__(self) -> ObjectLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def output_lock(folder: str | Path | Location, key: str = "run.output",
                ttl: float = 300.0) -> OutputLock | ObjectLease:
    """The one-writer guard for ``folder``: a hard-linked lock file on a filesystem, a lease
    object on an object store."""
    loc = resolve(folder)
    if loc.local:
        return OutputLock(loc.path if isinstance(folder, Location) else folder, key)
    return ObjectLease(loc, key, ttl)

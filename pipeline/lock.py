"""One writer per output folder: an exclusive lock file holding the holder's host and pid.

Created atomically (written to a temporary name, then hard-linked to ``.lock``, which fails
when the name exists). A lock left by a dead process on this host is taken over, and so is one
carrying this process's own pid on this host (a container restarted with the same hostname
gives its driver the same pid, often 1: the holder cannot be alive and be us). A live holder,
or any holder on another host (whose liveness cannot be checked from here), is refused with
its name and how to check it, so a second driver exits at once instead of deleting the first
one's temporary shards.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

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

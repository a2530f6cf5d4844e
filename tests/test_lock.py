"""One writer per folder (extraction's run.output, training's log.output): a lock whose holder
is gone is taken over, a live one is refused with how to check it and when to remove it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from pipeline.lock import LOCK, FolderLocked, OutputLock


def _write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                           "since": 0}))


def test_a_lock_with_our_own_pid_is_stale(tmp_path):
    # a container's driver restarted as pid 1 on the same hostname finds its own pid there
    _write_lock(tmp_path, os.getpid())
    with OutputLock(tmp_path) as lock:
        assert lock.held
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()


def test_a_dead_holder_is_taken_over(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    _write_lock(tmp_path, p.pid)
    with OutputLock(tmp_path) as lock:
        assert lock.held


def test_a_live_holder_is_refused_saying_how_to_check_it(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, p.pid)
        with pytest.raises(FolderLocked) as e:
            OutputLock(tmp_path).acquire()
        msg = str(e.value)
        assert f"ps -p {p.pid}" in msg and str(tmp_path / LOCK) in msg and "safe to delete" in msg
    finally:
        p.kill()
        p.wait()


def test_a_holder_on_another_host_is_refused_saying_when_to_remove_it(tmp_path):
    _write_lock(tmp_path, 12345, host="other-node-7")
    with pytest.raises(FolderLocked) as e:
        OutputLock(tmp_path).acquire()
    msg = str(e.value)
    assert "other-node-7" in msg and "ps -p 12345" in msg and "safe to delete" in msg

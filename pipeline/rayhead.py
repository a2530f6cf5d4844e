"""A single-machine Ray head that this project starts and stops itself (``make ray-up`` /
``make ray-down``, and the tests), without touching any other Ray on the machine.

``ray stop`` ends every Ray process of the machine, other users' jobs included. Instead, the
head is started in a process group of its own (``ray start`` runs as the leader of a new
session; every process it starts, GCS, raylet, dashboard, agents, workers, inherits the
group) under its own ``--temp-dir``. ``stop_head`` signals that group only: SIGTERM, then
SIGKILL for what is left after a grace period (the GCS and raylet do not exit on SIGTERM
alone). The group id and ports are kept in ``<temp-dir>/sea-head.json``; before signalling,
the group is checked to still hold a process of that head (its command line names the
temp dir), so a recycled id is never signalled.

Listening addresses: the dashboard and the client server follow ``--dashboard-host`` and the
node address (127.0.0.1 here), but Ray 2.60's GCS, raylet and worker gRPC servers listen on
every interface (the ``gcs_server`` binary hard-codes a 0.0.0.0 listener; measured with
``ss -ltnp``); Ray's token authentication (``RAY_AUTH_MODE=token``) is what guards them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = "sea-head.json"
WORKER_TMP = "tmp"  # TMPDIR of the head's processes


def _ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


def start_head(temp_dir: str | Path, port: int = 6379, dashboard_port: int = 8265,
               num_cpus: int | None = None, env: dict | None = None) -> dict:
    """Start a head on 127.0.0.1 in its own process group; -> its state (also written to
    ``temp_dir/sea-head.json``). Refuses when that folder already holds a live head."""
    tdir = Path(temp_dir).resolve()
    tdir.mkdir(parents=True, exist_ok=True)
    if _alive(tdir):
        raise RuntimeError(f"a Ray head started from {tdir} is still running (make ray-down first)")
    env = dict(env if env is not None else os.environ)
    env.setdefault("RAY_AUTH_MODE", "token")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # the head's processes and workers keep their temp files in its folder (ray-down kills
    # them, so what their imports leave in the machine's temp folder would stay); removed there
    (tdir / WORKER_TMP).mkdir(exist_ok=True)
    env["TMPDIR"] = str(tdir / WORKER_TMP)
    cmd = [_ray_cli(), "start", "--head", f"--temp-dir={tdir}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--port={port}",
           "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=300)
    state = {"pgid": proc.pid, "temp_dir": str(tdir), "port": port,
             "dashboard": f"http://127.0.0.1:{dashboard_port}"}
    (tdir / STATE).write_text(json.dumps(state))
    if proc.returncode != 0:
        stop_head(tdir)
        raise RuntimeError(f"ray start failed (rc {proc.returncode}):\n{out[-3000:]}")
    return state


def _group_members(pgid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid:
                    pids.append(int(d.name))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(tdir: Path) -> bool:
    state = tdir / STATE
    if not state.is_file():
        return False
    pgid = json.loads(state.read_text())["pgid"]
    return any(str(tdir) in _cmdline(p) for p in _group_members(pgid))


def stop_head(temp_dir: str | Path, grace_s: float = 10.0) -> int:
    """Stop the head started from ``temp_dir`` and everything in its process group; other Ray
    instances are left alone. -> the number of processes signalled (0: none was running)."""
    tdir = Path(temp_dir).resolve()
    state = tdir / STATE
    if not state.is_file():
        return 0
    pgid = json.loads(state.read_text())["pgid"]
    members = _group_members(pgid)
    if not any(str(tdir) in _cmdline(p) for p in members):
        state.unlink()
        return 0  # gone already (or the id now belongs to someone else: never signal it)
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline and _group_members(pgid):
            time.sleep(0.2)
        if not _group_members(pgid):
            break
    state.unlink(missing_ok=True)
    shutil.rmtree(tdir / WORKER_TMP, ignore_errors=True)
    return len(members)

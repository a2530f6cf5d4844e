"""Submit label extraction to an existing Ray cluster with ``ray job submit``.

The job runs ``python -m pipeline extract --config <file> run.runner=ray ...`` on the cluster
with this repository as its working dir (Ray uploads it, honouring .gitignore, so .venv,
shards and caches stay home). The config file is passed by its path inside the repository.
Token authentication (Ray >= 2.52; on by default for local clusters from 2.59): the
``ray`` CLI sends the token from ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``, the same one the cluster was started with.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# where the bucket is (not who may read it): passed on to the job so that a run.output or an
# input on an S3-compatible store resolves the same on the cluster. Credentials are not sent:
# nodes get them from their role or environment (docs/cloud.md).
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


def storage_env() -> dict[str, str]:
    return {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}


def submit_command(address: str, config: str | None, overrides: list[str], wait: bool = True,
                   python: str = "python", env_vars: dict | None = None) -> list[str]:
    ray_cli = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    entry = [python, "-m", "pipeline", "extract"]
    if config:
        cfg_path = Path(config).resolve()
        try:
            rel = cfg_path.relative_to(REPO)
        except ValueError:
            raise ValueError(f"--config {config} must be inside the repository ({REPO}) so the "
                             f"job's working dir carries it") from None
        entry += ["--config", str(rel)]
    entry += ["run.runner=ray", *overrides]
    env = dict(env_vars or {})  # the word list ships in the uploaded package itself
    cmd = [ray_cli, "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"env_vars": env})]
    if not wait:
        cmd.append("--no-wait")
    return [*cmd, "--", *entry]  # the ray CLI shell-quotes each entrypoint word itself


def submit(address: str, config: str | None, overrides: list[str], wait: bool = True,
           python: str = "python") -> int:
    cmd = submit_command(address, config, overrides, wait, python, env_vars=storage_env())
    print("+", shlex.join(cmd), flush=True)
    return subprocess.call(cmd)

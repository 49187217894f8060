"""The launch scripts turn Ray's token authentication on, hand the token to every `ray` and `tributary`
they start (from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or a file the head creates), and never print it,
not even under `bash -x`.

`ray`, `srun`, `scontrol`, `sleep`, `hostname`, `nvidia-smi` and `tributary` are stand-ins on PATH that
record the arguments and the token each call would authenticate with.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SECRET = "tok-5c0ffee-launch-scripts-never-print-this"

RECORDER = """#!{python}
import json, os, sys
path = os.environ.get("RAY_AUTH_TOKEN_PATH")
token = os.environ.get("RAY_AUTH_TOKEN") or (open(path).read().strip() if path and os.path.exists(path) else None)
with open(os.environ["CALLS"], "a") as calls:
    calls.write(json.dumps({{"argv": [os.path.basename(sys.argv[0])] + sys.argv[1:],
                            "mode": os.environ.get("RAY_AUTH_MODE"), "token": token}}) + "\\n")
"""
SRUN = """#!/usr/bin/env bash
# srun [--opt=value | -w HOST]... COMMAND...: run COMMAND here
while [ $# -gt 0 ]; do case "$1" in -w) shift 2;; -*) shift;; *) break;; esac; done
exec "$@"
"""


@pytest.fixture
def stand_ins(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "ray": RECORDER.format(python=sys.executable),
        "tributary": RECORDER.format(python=sys.executable),
        "srun": SRUN,
        "scontrol": "#!/usr/bin/env bash\nprintf 'node1\\nnode2\\n'\n",
        "sleep": "#!/usr/bin/env bash\n",
        "hostname": "#!/usr/bin/env bash\necho 10.9.8.7\n",
        "nvidia-smi": "#!/usr/bin/env bash\nexit 1\n",
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    calls = tmp_path / "calls.jsonl"
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH") and key != "RAY_ADDRESS"
    }
    environment.update(PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home), CALLS=str(calls), PYTHON=sys.executable)
    return {"env": environment, "calls": calls, "home": home, "root": tmp_path}


def run_script(stand_ins: dict, script: Path, *args: str, cwd: Path = ROOT, **env: str):
    """The script under `bash -x`, so a token expanded in any command would show in the output."""
    return subprocess.run(
        ["bash", "-x", str(script), *args],
        cwd=cwd,
        env=dict(stand_ins["env"], **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def calls(stand_ins: dict, expected: int) -> list[dict]:
    """The recorded calls, once `expected` of them arrived (the Slurm script starts some in the background)."""
    deadline = time.monotonic() + 20
    while True:
        text = stand_ins["calls"].read_text() if stand_ins["calls"].exists() else ""
        recorded = [json.loads(line) for line in text.splitlines()]
        if len(recorded) >= expected or time.monotonic() > deadline:
            return recorded
        time.sleep(0.1)


def assert_not_printed(result: subprocess.CompletedProcess, token: str) -> None:
    assert token not in result.stdout + result.stderr


def test_head_with_a_token_from_the_environment(stand_ins):
    result = run_script(stand_ins, ROOT / "launch/ray/start_head.sh", RAY_AUTH_TOKEN=SECRET, RAY_NODE_IP="10.0.0.5")
    assert result.returncode == 0, result.stderr
    [call] = calls(stand_ins, 1)
    assert call["argv"][:3] == ["ray", "start", "--head"]
    assert call["mode"] == "token" and call["token"] == SECRET
    assert_not_printed(result, SECRET)
    assert "10.0.0.5:6379" in result.stdout


def test_head_creates_a_private_token_file_and_never_prints_it(stand_ins):
    result = run_script(stand_ins, ROOT / "launch/ray/start_head.sh", RAY_NODE_IP="10.0.0.5")
    assert result.returncode == 0, result.stderr
    token_file = stand_ins["home"] / ".ray" / "auth_token"
    token = token_file.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", token)  # 256 bits, as `ray get-auth-token --generate` makes
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    [call] = calls(stand_ins, 1)
    assert call["mode"] == "token" and call["token"] == token
    assert_not_printed(result, token)
    assert str(token_file) in result.stdout + result.stderr  # where it is, so workers can be given it

    again = run_script(stand_ins, ROOT / "launch/ray/start_head.sh", RAY_NODE_IP="10.0.0.5")
    assert again.returncode == 0 and token_file.read_text().strip() == token  # kept, not replaced


def test_worker_and_submit_use_the_token_file(stand_ins, tmp_path):
    token_file = tmp_path / "shared" / "token"
    token_file.parent.mkdir()
    token_file.write_text(SECRET + "\n")
    worker = run_script(
        stand_ins, ROOT / "launch/ray/start_worker.sh", "10.0.0.5:6379", RAY_AUTH_TOKEN_PATH=str(token_file)
    )
    submit = run_script(stand_ins, ROOT / "launch/ray/submit.sh", "job.yaml", RAY_AUTH_TOKEN_PATH=str(token_file))
    assert worker.returncode == 0 and submit.returncode == 0, worker.stderr + submit.stderr
    start, job = calls(stand_ins, 2)
    assert start["argv"][:3] == ["ray", "start", "--address=10.0.0.5:6379"]
    assert job["argv"][:3] == ["ray", "job", "submit"]
    for call in (start, job):
        assert call["mode"] == "token" and call["token"] == SECRET
    for result in (worker, submit):
        assert_not_printed(result, SECRET)


@pytest.mark.parametrize("script", ["launch/ray/start_worker.sh", "launch/ray/submit.sh"])
def test_a_client_without_a_token_is_refused_before_ray_starts(stand_ins, script):
    result = run_script(stand_ins, ROOT / script, "10.0.0.5:6379")
    assert result.returncode != 0
    assert "RAY_AUTH_TOKEN" in result.stderr and "no token" in result.stderr
    assert calls(stand_ins, 0) == []


def test_slurm_gives_every_node_and_the_driver_the_same_token(stand_ins):
    workdir = stand_ins["root"] / "checkout"
    (workdir / ".venv" / "bin").mkdir(parents=True)
    (workdir / ".venv" / "bin" / "activate").write_text("")
    shutil.copytree(ROOT / "launch", workdir / "launch")
    result = run_script(
        stand_ins,
        workdir / "launch/slurm/tributary.sbatch",
        "job.yaml",
        cwd=workdir,
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_CPUS_PER_TASK="4",
        SLURM_GPUS_PER_NODE="0",
    )
    assert result.returncode == 0, result.stderr
    recorded = calls(stand_ins, 3)
    assert sorted(call["argv"][0] for call in recorded) == ["ray", "ray", "tributary"]
    token = (stand_ins["home"] / ".ray" / "auth_token").read_text().strip()
    assert all(call["mode"] == "token" and call["token"] == token for call in recorded), recorded
    assert_not_printed(result, token)


def test_kuberay_job_turns_token_auth_on():
    documents = list(yaml.safe_load_all((ROOT / "launch/kuberay/rayjob.yaml").read_text()))
    [job] = [document for document in documents if document["kind"] == "RayJob"]
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}

"""The API's OpenAPI document tells the truth: schemathesis, with every check, against a live stack
(redis-server, API, trainer, scorer as processes), with authentication off and on.

Every check runs: no server error; status codes,
content types, headers and bodies as documented; schema-invalid requests refused, schema-valid ones
accepted (where a rule the schema cannot state may refuse them, the config names the operations);
the Allow header; the stateful phase.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from alpipe.config import Settings
from alpipe.stack import LocalStack

REPO = Path(__file__).resolve().parents[2]
ADMIN = "t-admin-contract"
# Examples per operation and phase: about 1,400 requests in all, under a minute on two cores.
MAX_EXAMPLES = 25


@pytest.mark.parametrize("auth", [False, True], ids=["auth-off", "auth-on"])
def test_schemathesis_finds_nothing(auth: bool, tmp_path: Path) -> None:
    env = {"ALPIPE_ADMIN_TOKEN": ADMIN} if auth else {}
    headers = {"Authorization": f"Bearer {ADMIN}"} if auth else {}
    with LocalStack(Settings(data_dir=tmp_path, redis_url=""), scorers=1, trainers=1, echo=False,
                    extra_env=env) as stack:
        # One project, so the routes of a project are reached with a name that exists.
        httpx.post(f"{stack.api_url}/projects", json={"name": "pets", "classes": ["cat", "dog"]},
                   headers=headers).raise_for_status()
        # schemathesis.toml only names the operations where a rule the schema cannot state may refuse
        # schema-valid data.
        command = [str(Path(sys.executable).parent / "st"), "run", f"{stack.api_url}/openapi.json", "--checks", "all",
                   "--max-examples", str(MAX_EXAMPLES), "--workers", "1", "--no-color", "--seed", "1"]
        for name, value in headers.items():
            command += ["-H", f"{name}: {value}"]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
        stack.check_alive()
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "unique failure" not in result.stdout and "Runtime Error" not in result.stdout

"""`pdserve up` makes one deployment secret and hands it, with the API key, to its router and
instances in their environment, never on a command line; the deployment then admits clients
by the key and its own processes by the secret."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdserve.launch.credentials import Credentials
from pdserve.security import API_KEY_ENV, SECRET_ENV, DeploymentSecret, SecretError, sign_request
from tests.launch.test_up import READY, Up, descendants
from tests.router.cluster import REPO, env, free_port

KEY = "sk-up-test-0123456789"


def start_up_without_secret(tmp: Path, *flags: str) -> Up:
    """`pdserve up`, as a user runs it: no deployment secret in its environment."""
    port = free_port(run=2)
    out_path = tmp / "up.out"
    cmd = [sys.executable, "-m", "pdserve.cli", "up", *flags, "--port", str(port),
           "--log-dir", str(tmp / "logs")]
    child_env = {k: v for k, v in env().items() if k not in (SECRET_ENV, API_KEY_ENV)}
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**child_env, "COLUMNS": "200"},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Up(proc, out_path, f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def up(tmp_path_factory) -> Iterator[Up]:
    deployment = start_up_without_secret(tmp_path_factory.mktemp("up-creds"), "--colocated",
                                         "1", "--cpu", "--kv-cache-memory", "64MiB",
                                         "--api-key", KEY)
    try:
        deployment.wait_for(READY, timeout_s=300)
        yield deployment
    finally:
        if deployment.proc.poll() is None:
            deployment.proc.send_signal(signal.SIGTERM)
            try:
                deployment.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in descendants(deployment.proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                deployment.proc.kill()
                deployment.proc.wait()


def servers(up: Up) -> dict[str, dict]:
    """The router's and the instance's cmdline and environment, by subcommand."""
    out = {}
    for pid in descendants(up.proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pdserve.cli" in cmdline:
            sub = cmdline[cmdline.index(b"pdserve.cli") + 1].decode()
            out[sub] = {"cmdline": b" ".join(cmdline).decode(errors="replace"),
                        "env": dict(e.decode(errors="replace").partition("=")[::2]
                                    for e in environ if e)}
    return out


def test_one_secret_and_the_key_reach_every_process_in_the_environment_only(up):
    found = servers(up)
    assert set(found) == {"router", "serve"}, found.keys()
    secrets = {found[s]["env"].get(SECRET_ENV) for s in found}
    assert len(secrets) == 1
    secret = secrets.pop()
    assert secret and len(secret) >= 32  # generated: 32 random bytes, as hex
    assert secret != os.environ.get(SECRET_ENV)  # not the tests' own: `up` made it
    for info in found.values():
        assert info["env"].get(API_KEY_ENV) == KEY
        assert secret not in info["cmdline"] and KEY not in info["cmdline"]


def test_the_deployment_admits_clients_by_key_and_itself_by_secret(up):
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0.0}
    assert httpx.post(up.url + "/v1/completions", json=body, timeout=60).status_code == 401
    resp = httpx.post(up.url + "/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 200, resp.text
    assert httpx.get(up.url + "/health", timeout=10).status_code == 200
    ours = DeploymentSecret.from_text(servers(up)["router"]["env"][SECRET_ENV])
    other = DeploymentSecret.from_env()  # the tests' secret: another deployment's
    assert httpx.get(up.url + "/instances", timeout=10,
                     headers=sign_request(other, "GET", "/instances")).status_code == 401
    listed = httpx.get(up.url + "/instances", timeout=10,
                       headers=sign_request(ours, "GET", "/instances"))
    assert listed.status_code == 200
    (instance,) = listed.json()["instances"]
    direct = httpx.post(instance["url"] + "/v1/completions", json=body, timeout=60)
    assert direct.status_code == 401  # the key guards the instance too


def args(**given) -> argparse.Namespace:
    return argparse.Namespace(**{"secret_file": None, "api_key": None, "open_metrics": False,
                                 **given})


def test_credentials_take_the_users_secret_or_make_one(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    made = Credentials.from_args(args())
    assert made.secret != Credentials.from_args(args()).secret  # one per deployment
    assert made.env() == {SECRET_ENV: made.secret.to_text()} and made.flags() == []
    assert DeploymentSecret.from_text(made.env()[SECRET_ENV]) == made.secret
    monkeypatch.setenv(SECRET_ENV, "the-users-own-secret-0123456789")
    monkeypatch.setenv(API_KEY_ENV, "sk-from-env")
    given = Credentials.from_args(args(open_metrics=True))
    assert given.env() == {SECRET_ENV: "the-users-own-secret-0123456789",
                           API_KEY_ENV: "sk-from-env"}
    assert given.flags() == ["--open-metrics"]
    path = tmp_path / "secret"
    path.write_text("a-secret-from-a-file-0123456789\n")
    from_file = Credentials.from_args(args(secret_file=str(path), api_key="sk-flag"))
    assert from_file.env() == {SECRET_ENV: "a-secret-from-a-file-0123456789",
                               API_KEY_ENV: "sk-flag"}
    path.write_text("short")
    with pytest.raises(SecretError):
        Credentials.from_args(args(secret_file=str(path)))

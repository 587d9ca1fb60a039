"""The `pdserve` command as a user runs it (subprocesses): --version, `python -m pdserve`,
a sub-command's own usage on a bad flag, --chat-template and --log-requests."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from pdserve import __version__
from pdserve.server.chat_template import install_chat_template, read_chat_template
from tests.router.cluster import REPO, env, spawn, wait_healthy

TEMPLATE = ("{% for m in messages %}<<{{ m.role }}>>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<<assistant>>{% endif %}")


def pdserve(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve", *argv], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)


def test_version_through_python_dash_m():
    done = pdserve("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"pdserve {__version__}"


@pytest.mark.parametrize("command", ["serve", "router"])
def test_an_unknown_flag_shows_the_sub_commands_usage(command):
    done = pdserve(command, "--bad-flag")
    assert done.returncode == 2
    assert f"usage: pdserve {command}" in done.stderr
    assert f"pdserve {command}: error: unrecognized arguments: --bad-flag" in done.stderr


def test_a_chat_template_that_does_not_parse_stops_the_server_at_once():
    done = pdserve("serve", "--chat-template", "{% if %}", "--port", "1")
    assert done.returncode == 2 and "--chat-template does not parse" in done.stderr


def test_a_chat_template_names_a_file_or_is_inline(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    assert read_chat_template(str(path)) == TEMPLATE == read_chat_template(TEMPLATE)
    with pytest.raises(ValueError, match="neither a file"):
        read_chat_template(str(tmp_path / "missing.jinja"))


def test_a_chat_template_that_fails_to_render_is_refused(smollm2_tokenizer):
    import copy

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    with pytest.raises(ValueError, match="does not render"):
        install_chat_template(tokenizer, "{{ raise_exception('no system prompts') }}")
    with pytest.raises(ValueError, match="without its messages"):
        install_chat_template(tokenizer, "{{ bos_token }}hello")


def test_chat_template_and_request_log_on_a_running_server(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    srv = spawn(tmp_path, "serve", "serve", "--chat-template", str(path), "--log-requests",
                "--max-log-len", "12", "--kv-cache-memory", "64MiB")
    try:
        wait_healthy(srv)
        messages = [{"role": "user", "content": "Say hello to the whole wide world"}]
        ids = httpx.post(srv.url + "/tokenize", json={"messages": messages},
                         timeout=60).json()["tokens"]
        text = httpx.post(srv.url + "/detokenize", json={"tokens": ids}, timeout=60).json()
        assert text["prompt"] == "<<user>>Say hello to the whole wide world\n<<assistant>>"
        answer = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "messages": messages, "max_tokens": 2, "temperature": 0.0})
        assert answer.status_code == 200, answer.text
        log = srv.log()
        assert f"request {answer.json()['id']}: prompt" in log
        assert "Say hello to the whole wide world" not in log  # cut to 12 characters
        assert "'temperature': 0.0" in log
    finally:
        srv.stop()

"""The rendered prefill and decode pods' commands, run as processes the way the kubelet
would (see test_kubernetes_pods.py), each with a host identity of its own as each pod has:
D pulls P's KV over TCP from the address P's `--kv-host $(POD_IP)` names, and the greedy
text is the one D gives computing the whole prompt itself."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from pdserve.cli import build_parser
from pdserve.launch.kubernetes import KubeOptions, render
from pdserve.launch.layout import Layout
from tests.launch.test_kubernetes_pods import FILE_SECRET, pod_args, start
from tests.router.cluster import GREEDY, free_port, metric, wait_healthy

KV_HOST_FLAG = not build_parser("serve").parse_known_args(["serve", "--kv-host", "10.0.0.1"])[1]
pytestmark = pytest.mark.skipif(not KV_HOST_FLAG, reason="serve --kv-host comes with issue "
                                "18's cross-host KV transport (branch ray)")
PROMPT = ("A recipe for bread needs flour, water, salt and yeast. Mix them, knead the dough "
          "for ten minutes, let it rise for an hour, shape it and bake it. The three "
          "primary colours are")  # several KV blocks


@pytest.fixture(scope="module")
def pd_pods(tmp_path_factory):
    tmp: Path = tmp_path_factory.mktemp("k8s-pd-pods")
    (tmp / "deployment-secret").write_text(FILE_SECRET)
    # no prefix cache: D's own answer leaves nothing that would shorten the pull
    layout = Layout(prefill=1, decode=1, cpu=True, instance_args=["--no-enable-prefix-caching"])
    objects = render(layout, KubeOptions(cpus_per_rank=1))
    args = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["args"]
            for d in objects if d["kind"] == "Deployment"}
    ports = {name: free_port() for name in args}
    dns = {"pdserve-router-internal:8000": f"127.0.0.1:{ports['pdserve-router']}"}
    started = []
    try:
        for name in ("pdserve-router", "pdserve-prefill", "pdserve-decode"):
            started.append(start(tmp, name, pod_args(args[name], ports[name], dns, tmp),
                                 ports[name], {"PDSERVE_HOST_ID": name}))  # a pod's hostname
        router, prefill, decode = started
        wait_healthy(prefill, decode)
        wait_healthy(router)  # 200 once both registered and passed a health check
        yield router, prefill, decode
    finally:
        for p in reversed(started):
            p.stop()


def test_decode_pulls_the_prompt_over_tcp_and_the_text_is_decodes_own(pd_pods):
    router, prefill, decode = pd_pods
    body = {"prompt": PROMPT, "max_tokens": 12, **GREEDY}
    whole = httpx.post(decode.url + "/v1/completions", json=body, timeout=120)  # D alone
    assert whole.status_code == 200, whole.text
    via_pd = httpx.post(router.url + "/v1/completions", json=body, timeout=120)
    assert via_pd.status_code == 200, via_pd.text + router.log()
    assert via_pd.json()["choices"][0]["text"] == whole.json()["choices"][0]["text"]
    pulls = metric(decode.url, "pdserve:kv_pulls_by_transport_total", transport="tcp")
    assert pulls == 1, decode.log()

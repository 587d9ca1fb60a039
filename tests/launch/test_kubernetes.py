"""`pdserve deploy k8s`: manifests that pass the Kubernetes schemas (kubernetes-validate,
offline, strict) and mean what the layout says: replicas, GPUs = TP, the secret as a file,
probes on /health, one port everywhere, and commands that pdserve's own parsers accept."""

from __future__ import annotations

import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, latest_version

from pdserve.cli import build_parser, main
from pdserve.launch.kubernetes import (
    GPU_RESOURCE,
    SECRET_DIR,
    SECRET_KEY,
    KubeOptions,
    render,
    router_url,
)
from pdserve.launch.layout import Layout
from tests.launch.servicemonitor_schema import SERVICE_MONITOR

KV_HOST_FLAG = not build_parser("serve").parse_known_args(["serve", "--kv-host", "10.0.0.1"])[1]
KUBE_VERSIONS = ("1.29.0", latest_version())  # an old supported release and the newest

LAYOUTS = {
    "1P1D": Layout(prefill=1, decode=1),
    "2P1D-decode-tp2": Layout(prefill=2, decode=1, decode_tp=2),
    "8P2D": Layout(prefill=8, decode=2),
    "8P2D-decode-tp4": Layout(prefill=8, decode=2, decode_tp=4),  # llm-d's P/D guide
    "colocated-tp2": Layout(colocated=3, colocated_tp=2),
    "1P1D-cpu": Layout(prefill=1, decode=1, cpu=True, kv_cache_memory="1GiB"),
}
FULL = KubeOptions(name="llm", namespace="serving", generate_secret=True,
                   api_key_secret="llm-api-key", model_pvc="models",
                   node_selector={"nvidia.com/gpu.product": "NVIDIA-H200"})
FULL_LAYOUT = Layout(prefill=2, decode=1, decode_tp=2, model="/models/llama",
                     routing_policy="cache_aware", pd_min_prompt_tokens=512,
                     pd_max_stall_ms=400, instance_args=["--max-num-seqs", "64"])


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in of_kind(objects, kind) if o["metadata"]["name"] == name)


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def parseable(args: list[str]) -> list[str]:
    """The args, less `--kv-host` where this checkout's serve lacks it: issue 18's cross-host
    KV transport (branch ray) adds the flag."""
    if KV_HOST_FLAG or "--kv-host" not in args:
        return args
    i = args.index("--kv-host")
    return args[:i] + args[i + 2:]


def builtin(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] != "ServiceMonitor"]


# ---- the schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", [*LAYOUTS, "full-options"])
def test_every_object_passes_the_kubernetes_schemas_strictly(name, version):
    objects = (render(FULL_LAYOUT, FULL) if name == "full-options"
               else render(LAYOUTS[name], KubeOptions()))
    for obj in builtin(objects):  # strict: an unknown field fails too
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_schema_check_refuses_a_wrong_manifest():
    deployment = of_kind(render(LAYOUTS["1P1D"], KubeOptions()), "Deployment")[1]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError, match="replicas|two"):
        kubernetes_validate.validate(deployment, latest_version(), strict=True)
    deployment["spec"]["replicas"] = 1
    container(deployment)["readinesProbe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, latest_version(), strict=True)


def test_kubernetes_validate_skips_the_service_monitor_so_it_is_checked_against_its_crd():
    (monitor,) = of_kind(render(FULL_LAYOUT, FULL), "ServiceMonitor")
    with pytest.raises(SchemaNotFoundError):
        kubernetes_validate.validate(monitor, latest_version(), strict=True)
    jsonschema.validate(monitor, SERVICE_MONITOR)
    del monitor["spec"]["selector"]
    with pytest.raises(jsonschema.ValidationError, match="selector"):
        jsonschema.validate(monitor, SERVICE_MONITOR)


# ---- what the objects mean -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_role_has_its_count_of_pods_with_tp_gpus_each(name):
    layout = LAYOUTS[name]
    objects = render(layout, KubeOptions())
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    expected = {"pdserve-router": (1, 0)}
    for role in ("prefill", "decode", "colocated"):
        if getattr(layout, role):
            gpus = 0 if layout.cpu else getattr(layout, f"{role}_tp")
            expected[f"pdserve-{role}"] = (getattr(layout, role), gpus)
    got = {n: (d["spec"]["replicas"],
               container(d)["resources"]["limits"].get(GPU_RESOURCE, 0))
           for n, d in deployments.items()}
    assert got == expected
    for name, d in deployments.items():
        args = container(d)["args"]
        tp = got[name][1] or 1
        if name != "pdserve-router" and not layout.cpu:
            assert args.count("--tensor-parallel-size") == (tp > 1)
            if tp > 1:
                assert flag(args, "--tensor-parallel-size") == str(tp)


def test_8p2d_asks_for_16_gpus_as_llm_d_guide():
    objects = render(LAYOUTS["8P2D-decode-tp4"], KubeOptions())
    total = sum(d["spec"]["replicas"] * container(d)["resources"]["limits"].get(GPU_RESOURCE, 0)
                for d in of_kind(objects, "Deployment"))
    assert total == 8 * 1 + 2 * 4


def test_a_cpu_layout_asks_for_no_gpu_and_serves_on_the_cpu_threads_it_was_given():
    objects = render(LAYOUTS["1P1D-cpu"], KubeOptions(cpus_per_rank=3))
    for d in of_kind(objects, "Deployment")[1:]:
        c = container(d)
        assert GPU_RESOURCE not in c["resources"]["limits"]
        assert "tolerations" not in d["spec"]["template"]["spec"]
        assert flag(c["args"], "--device") == "cpu"
        assert flag(c["args"], "--cpu-threads") == "3" == c["resources"]["limits"]["cpu"]
        assert flag(c["args"], "--kv-cache-memory") == "1GiB"


def test_tp_never_spans_nodes():
    with pytest.raises(ValueError, match="exceeds --gpus-per-node 4"):
        render(Layout(prefill=1, decode=1, decode_tp=8), KubeOptions(gpus_per_node=4))


def test_every_pod_reads_the_secret_from_a_mounted_secret_never_from_the_manifest():
    objects = render(LAYOUTS["2P1D-decode-tp2"], KubeOptions(name="llm"))
    assert not of_kind(objects, "Secret")
    for d in of_kind(objects, "Deployment"):
        pod = d["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if "secret" in v]
        assert volume["secret"]["secretName"] == "llm-deployment-secret"
        assert volume["secret"]["items"] == [{"key": SECRET_KEY, "path": SECRET_KEY}]
        c = container(d)
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == SECRET_DIR and mount["readOnly"]
        assert flag(c["args"], "--secret-file") == f"{SECRET_DIR}/{SECRET_KEY}"
        assert "PDSERVE_DEPLOYMENT_SECRET" not in {e["name"] for e in c["env"]}


def test_a_generated_secret_is_new_each_time_and_long_enough():
    values = [of_kind(render(LAYOUTS["1P1D"], KubeOptions(generate_secret=True)), "Secret")[0]
              for _ in range(2)]
    texts = [v["stringData"][SECRET_KEY] for v in values]
    assert texts[0] != texts[1] and all(len(t) >= 32 for t in texts)
    assert values[0]["metadata"]["name"] == "pdserve-deployment-secret"


def test_instances_are_probed_on_health_and_the_router_is_alive_while_it_listens():
    objects = render(LAYOUTS["1P1D"], KubeOptions(startup_timeout_s=600))
    for d in of_kind(objects, "Deployment"):
        c = container(d)
        assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        if d["metadata"]["name"] == "pdserve-router":  # /health is 503 until one registers
            assert c["livenessProbe"]["tcpSocket"] == {"port": "http"}
            assert "startupProbe" not in c
        else:
            assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
            start = c["startupProbe"]
            assert start["httpGet"]["path"] == "/health"
            assert start["periodSeconds"] * start["failureThreshold"] >= 600
        drain = float(flag(c["args"], "--drain-timeout"))
        assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain


def test_one_port_everywhere_and_every_service_selects_pods_that_exist():
    layout = Layout(prefill=2, decode=1, decode_tp=2, port=9000)
    objects = render(layout, KubeOptions())
    pods = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    for d in pods.values():
        assert d["spec"]["selector"]["matchLabels"].items() <= \
            d["spec"]["template"]["metadata"]["labels"].items()
        assert container(d)["ports"] == [{"name": "http", "containerPort": 9000,
                                          "protocol": "TCP"}]
        assert flag(container(d)["args"], "--port") == "9000"
    for svc in of_kind(objects, "Service"):
        assert svc["spec"]["ports"] == [{"name": "http", "port": 9000, "targetPort": "http",
                                         "protocol": "TCP"}]
        chosen = [d for d in pods.values() if svc["spec"]["selector"].items()
                  <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(chosen) == 1


def test_instances_register_with_the_router_under_their_pod_ip():
    layout = Layout(prefill=1, decode=1)
    objects = render(layout, KubeOptions(name="llm"))
    internal = named(objects, "Service", "llm-router-internal")
    assert internal["spec"]["publishNotReadyAddresses"] is True  # before the router is ready
    assert internal["spec"]["selector"] == named(objects, "Service", "llm-router")["spec"][
        "selector"]
    assert router_url(layout, KubeOptions(name="llm")) == "http://llm-router-internal:8000"
    for role in ("prefill", "decode"):
        c = container(named(objects, "Deployment", f"llm-{role}"))
        assert flag(c["args"], "--router") == "http://llm-router-internal:8000"
        assert flag(c["args"], "--advertise-url") == "http://$(POD_IP):8000"
        assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} \
            in c["env"]
        assert flag(c["args"], "--role") == role


def test_the_service_monitor_scrapes_metrics_of_the_router_and_each_role_once():
    objects = render(FULL_LAYOUT, FULL)
    (monitor,) = of_kind(objects, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["authorization"]["credentials"] == {"name": "llm-api-key", "key": "api-key"}
    sel = monitor["spec"]["selector"]
    (expr,) = sel["matchExpressions"]
    scraped = [s["metadata"]["name"] for s in of_kind(objects, "Service")
               if sel["matchLabels"].items() <= s["metadata"]["labels"].items()
               and s["metadata"]["labels"][expr["key"]] in expr["values"]]
    assert scraped == ["llm-router", "llm-prefill", "llm-decode"]


def test_prefill_and_decode_pods_serve_kv_on_their_pod_ip():
    objects = render(Layout(prefill=1, decode=1, colocated=1), KubeOptions())
    for d in of_kind(objects, "Deployment")[1:]:
        args = container(d)["args"]
        role = flag(args, "--role")
        assert ("--kv-host" in args) == (role != "colocated")
        if role != "colocated":
            assert flag(args, "--kv-host") == "$(POD_IP)"


def test_the_commands_are_ones_pdserve_accepts():
    objects = render(FULL_LAYOUT, FULL)
    for d in of_kind(objects, "Deployment"):
        c = container(d)
        assert c["command"] == ["pdserve"]
        command = c["args"][0]
        args = build_parser(command).parse_args(parseable(c["args"]))
        if command == "router":
            assert args.routing_policy == "cache_aware" and args.tokenizer == "/models/llama"
            assert args.pd_min_prompt_tokens == 512 and args.pd_max_stall_ms == 400
            assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/models"}
        else:
            assert args.model == "/models/llama" and args.max_num_seqs == 64
        assert {"name": "PDSERVE_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": "llm-api-key", "key": "api-key"}}} in c["env"]


# ---- the command ---------------------------------------------------------------------------


def test_deploy_k8s_renders_the_same_layout_from_yaml_as_from_flags(tmp_path, capsys):
    config = tmp_path / "layout.yaml"
    config.write_text("prefill: 2\ndecode: {count: 1, tp: 2}\nport: 8100\n")
    assert main(["deploy", "k8s", "--config", str(config)]) == 0
    from_yaml = [o for o in yaml.safe_load_all(capsys.readouterr().out) if o]
    assert main(["deploy", "k8s", "--prefill", "2", "--decode", "1", "--decode-tp", "2",
                 "--port", "8100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# pdserve deployment 'pdserve': 2 prefill, 1 decode (TP 2)")
    assert "kubectl create secret generic pdserve-deployment-secret" in out
    assert from_yaml == [o for o in yaml.safe_load_all(out) if o]


def test_deploy_k8s_writes_a_folder_kustomize_can_apply(tmp_path):
    out = tmp_path / "k8s"
    assert main(["deploy", "k8s", "--colocated", "2", "--generate-secret", "--out",
                 str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [".gitignore", "colocated.yaml", "kustomization.yaml", "monitoring.yaml",
                     "router.yaml", "secret.yaml"]
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["router.yaml", "colocated.yaml", "monitoring.yaml"]
    assert (out / ".gitignore").read_text() == "secret.yaml\n"  # never committed
    kinds = [o["kind"] for o in yaml.safe_load_all((out / "router.yaml").read_text())]
    assert kinds == ["Service", "Service", "Deployment"]


def test_a_cluster_without_the_prometheus_operator_gets_no_service_monitor(capsys):
    assert main(["deploy", "k8s", "--no-service-monitor"]) == 0
    out = capsys.readouterr().out
    assert "ServiceMonitor" not in out
    assert [o["kind"] for o in yaml.safe_load_all(out) if o].count("Deployment") == 3


@pytest.mark.parametrize("argv,message", [
    (["--decode-tp", "16"], "exceeds --gpus-per-node 8"),
    (["--name", "Bad_Name"], "--name"),
    (["--node-selector", "novalue"], "KEY=VALUE"),
    (["--cpus-per-rank", "0"], "--cpus-per-rank"),
    (["--scrape-interval", "soon"], "--scrape-interval"),
    (["--node-selector", "gpu=H200 SXM"], "--node-selector"),
    (["--node-selector", "bad_/key=x"], "--node-selector"),
    (["--image", "my image"], "--image"),
    (["--port", "70000"], "--port"),
    (["--prefill", "1", "--decode", "0"], "both prefill and decode"),
])
def test_deploy_k8s_refuses_what_it_cannot_render_naming_the_flag(argv, message, capsys):
    assert main(["deploy", "k8s", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_folder(tmp_path):
    out = tmp_path / "k8s"
    assert main(["deploy", "k8s", "--prefill", "2", "--decode", "1", "--decode-tp", "2",
                 "--out", str(out)]) == 0
    built = subprocess.run(["kubectl", "kustomize", str(out)], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    kinds = sorted(o["kind"] for o in yaml.safe_load_all(built) if o)
    assert kinds == ["Deployment"] * 3 + ["Service"] * 4 + ["ServiceMonitor"]

"""Kubernetes manifests for a layout: the same `Layout` as `pdserve up`, as plain objects.

What a layout becomes (NAME is `KubeOptions.name`):

- `NAME-router`: a Deployment of one router and the clients' Service. The router is ready
  while an instance can serve (/health); it is alive while it listens.
- `NAME-router-internal`: a Service for the instances' /register heartbeats that also lists
  a router that is not ready yet: without it no instance could register, and the router
  would never become ready.
- `NAME-<role>` for each role of the layout: a Deployment of `count` pods, each one
  instance with `nvidia.com/gpu: tp` (TP within one pod), and a headless Service (for
  scraping and DNS; clients go through the router). Each pod registers itself with the
  router under its pod IP (downward API), so `kubectl scale` adds or removes instances.
  A prefill pod's KV source listens on its pod IP (`serve --kv-host`), on a port it picks
  per TP rank and names in each hand-off: P and D pods must reach each other on any TCP
  port (Kubernetes' default; a NetworkPolicy must allow it between them).
- A ServiceMonitor (Prometheus operator) scraping /metrics of the router and instances.
- The deployment secret is a Secret mounted as a file (`--secret-file`); it is rendered
  only on request, with a fresh value, so that the manifests one commits never hold it.

Objects are plain dicts (what `kubectl` reads), built by small functions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from pdserve import __version__
from pdserve.drain import DEFAULT_DRAIN_TIMEOUT_S
from pdserve.launch.layout import ROLES, Layout
from pdserve.router.prompt_tokens import EMBEDDED
from pdserve.security import DeploymentSecret

SECRET_KEY = "deployment-secret"  # the key of the Secret, and the file's name in the pod
SECRET_DIR = "/etc/pdserve/secret"
API_KEY_KEY = "api-key"  # the key of the clients' API key in --api-key-secret
MODEL_DIR = "/models"  # where --model-pvc is mounted
PORT_NAME = "http"
PROBE_PERIOD_S = 10
STOP_GRACE_S = 15  # past the drain: time for the engine to stop before SIGKILL
GPU_RESOURCE = "nvidia.com/gpu"
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LONGEST_SUFFIX = len("-router-internal")


@dataclass
class KubeOptions:
    """Where and how the layout runs in the cluster (what `pdserve up` learns from the
    machine it runs on)."""

    name: str = "pdserve"
    namespace: str | None = None  # None: the namespace `kubectl apply` uses
    image: str = f"pdserve:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    model_pvc: str | None = None  # a PersistentVolumeClaim mounted read-only at /models
    secret_name: str | None = None  # None: NAME-deployment-secret
    generate_secret: bool = False  # render the Secret too, with a fresh value
    api_key_secret: str | None = None  # a Secret whose `api-key` is the clients' API key
    service_type: str = "ClusterIP"  # of the router's Service
    gpus_per_node: int = 8  # TP never spans pods: a pod's GPUs are one node's
    cpus_per_rank: int | None = None  # None: 4 on GPU, 2 on CPU
    memory_per_rank_gib: int | None = None  # None: 32 on GPU, 4 on CPU
    router_cpus: int = 2
    router_memory_gib: int = 2
    node_selector: dict[str, str] = field(default_factory=dict)
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    startup_timeout_s: float = 900.0  # model load and warm-up, before liveness starts
    scrape_interval: str = "15s"
    service_monitor: bool = True  # needs the Prometheus operator's CRDs in the cluster

    def __post_init__(self) -> None:
        if not _DNS_LABEL.match(self.name) or len(self.name) > 63 - _LONGEST_SUFFIX:
            raise ValueError(f"--name {self.name!r}: lowercase letters, digits and '-', "
                             f"starting with a letter, at most {63 - _LONGEST_SUFFIX} long")
        for flag, value in (("--namespace", self.namespace), ("--secret-name",
                            self.secret_name), ("--model-pvc", self.model_pvc),
                            ("--api-key-secret", self.api_key_secret)):
            if value is not None and not _is_dns_subdomain(value):
                raise ValueError(f"{flag} {value!r} is not a valid Kubernetes name")
        if self.service_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
            raise ValueError("--service-type must be ClusterIP, NodePort or LoadBalancer")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ValueError("--image-pull-policy must be Always, IfNotPresent or Never")
        for flag, value in (("--gpus-per-node", self.gpus_per_node),
                            ("--cpus-per-rank", self.cpus_per_rank),
                            ("--memory-per-rank-gib", self.memory_per_rank_gib),
                            ("--router-cpus", self.router_cpus),
                            ("--router-memory-gib", self.router_memory_gib)):
            if value is not None and not 1 <= value <= 4096:
                raise ValueError(f"{flag} must be between 1 and 4096")
        if not 0 <= self.drain_timeout_s <= 3600:
            raise ValueError("--drain-timeout must be between 0 and 3600 seconds")
        if not PROBE_PERIOD_S <= self.startup_timeout_s <= 24 * 3600:
            raise ValueError(f"--startup-timeout must be between {PROBE_PERIOD_S} s and a day")
        if not re.fullmatch(r"[1-9][0-9]*(ms|s|m)", self.scrape_interval):
            raise ValueError("--scrape-interval must look like 15s, 500ms or 1m")
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"--image {self.image!r}: an image reference has no spaces")
        for key, value in self.node_selector.items():
            if not _is_label_key(key) or not _is_label_value(value):
                raise ValueError(f"--node-selector {key}={value}: not a valid label key and "
                                 "value")

    @property
    def secret(self) -> str:
        return self.secret_name or f"{self.name}-deployment-secret"


def _is_label_value(text: str) -> bool:
    return len(text) <= 63 and re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?",
                                            text) is not None


def _is_label_key(text: str) -> bool:
    prefix, _, name = text.rpartition("/")
    return bool(name) and _is_label_value(name) and (not prefix or _is_dns_subdomain(prefix))


def _is_dns_subdomain(text: str) -> bool:
    return len(text) <= 253 and all(
        re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", part) for part in text.split("."))


# ---- the whole deployment ----------------------------------------------------------------


def render(layout: Layout, opts: KubeOptions) -> list[dict]:
    """Every object of the deployment, in the order `kubectl apply` should create them."""
    check_fits(layout, opts)
    objects = [deployment_secret(opts)] if opts.generate_secret else []
    objects += [router_service(layout, opts), router_internal_service(layout, opts),
                router_deployment(layout, opts)]
    for role in roles_of(layout):
        objects += [instance_service(role, layout, opts), instance_deployment(role, layout, opts)]
    if opts.service_monitor:
        objects.append(service_monitor(layout, opts))
    return objects


def roles_of(layout: Layout) -> list[str]:
    return [r for r in ROLES if getattr(layout, r)]


def check_fits(layout: Layout, opts: KubeOptions) -> None:
    """A port a container can have; TP inside one pod, so inside one node: a larger TP
    cannot be scheduled."""
    if not 1 <= layout.port <= 65535:
        raise ValueError(f"--port {layout.port}: must be between 1 and 65535")
    for role in roles_of(layout):
        tp = getattr(layout, f"{role}_tp")
        if not layout.cpu and tp > opts.gpus_per_node:
            raise ValueError(f"{role} TP {tp} exceeds --gpus-per-node {opts.gpus_per_node}: "
                             "pdserve's tensor parallelism runs within one pod (one node)")


def deployment_secret(opts: KubeOptions) -> dict:
    """A Secret holding a new deployment secret (never commit the manifest that holds it)."""
    value = DeploymentSecret.generate().to_text()
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": _meta(opts, opts.secret, "secret"),
            "type": "Opaque", "stringData": {SECRET_KEY: value}}


# ---- the router ---------------------------------------------------------------------------


def router_url(layout: Layout, opts: KubeOptions) -> str:
    """Where instances register: the internal Service (a short name: same namespace)."""
    return f"http://{opts.name}-router-internal:{layout.port}"


def router_args(layout: Layout, opts: KubeOptions) -> list[str]:
    """`pdserve router ...` in the pod: no instance URLs, the instances register."""
    args = ["router", "--host", "0.0.0.0", "--port", str(layout.port),
            "--secret-file", f"{SECRET_DIR}/{SECRET_KEY}",
            "--drain-timeout", _seconds(opts.drain_timeout_s)]
    if layout.pd_min_prompt_tokens:
        args += ["--pd-min-prompt-tokens", str(layout.pd_min_prompt_tokens)]
    if layout.pd_max_stall_ms is not None:
        args += ["--pd-max-stall-ms", f"{layout.pd_max_stall_ms:g}"]
    if layout.routing_policy != "least_loaded":
        args += ["--routing-policy", layout.routing_policy,
                 "--tokenizer", layout.model or EMBEDDED]
    return args


def router_deployment(layout: Layout, opts: KubeOptions) -> dict:
    """One router: instances register with one router (a second would see none of them)."""
    container = {
        "name": "router", "image": opts.image, "imagePullPolicy": opts.image_pull_policy,
        "command": ["pdserve"], "args": router_args(layout, opts),
        "ports": [{"name": PORT_NAME, "containerPort": layout.port, "protocol": "TCP"}],
        "env": _api_key_env(opts),
        "resources": _resources(opts.router_cpus, opts.router_memory_gib, gpus=0),
        # 503 while no instance can serve: not ready, but restarting would not help (/ping
        # is /health, and /version wants the API key where one is set): alive = listening
        "readinessProbe": _http_probe(period_s=5, failures=2),
        "livenessProbe": {"tcpSocket": {"port": PORT_NAME}, "periodSeconds": PROBE_PERIOD_S,
                          "timeoutSeconds": 5, "failureThreshold": 3},
        "volumeMounts": _secret_mounts() + _model_mounts(layout, opts, tokenizes=True),
    }
    pod = _pod_spec(opts, [container], _secret_volumes(opts)
                    + _model_volumes(layout, opts, tokenizes=True))
    return _deployment(opts, "router", 1, pod)


def router_service(layout: Layout, opts: KubeOptions) -> dict:
    """The clients' entry point: only a ready router gets traffic."""
    return _service(opts, "router", f"{opts.name}-router", layout.port,
                    {"type": opts.service_type})


def router_internal_service(layout: Layout, opts: KubeOptions) -> dict:
    """Registration reaches the router before it is ready (it is ready once one has)."""
    return _service(opts, "router-internal", f"{opts.name}-router-internal", layout.port,
                    {"type": "ClusterIP", "publishNotReadyAddresses": True},
                    selector_component="router")


# ---- the instances ------------------------------------------------------------------------


def instance_args(role: str, layout: Layout, opts: KubeOptions) -> list[str]:
    """`pdserve serve ...` in one pod of `role`; $(POD_IP) is filled in by Kubernetes."""
    tp = getattr(layout, f"{role}_tp")
    args = ["serve", "--role", role, "--host", "0.0.0.0", "--port", str(layout.port),
            "--router", router_url(layout, opts),
            "--advertise-url", f"http://$(POD_IP):{layout.port}",
            "--secret-file", f"{SECRET_DIR}/{SECRET_KEY}",
            "--drain-timeout", _seconds(opts.drain_timeout_s)]
    if role != "colocated":  # D pods dial P's KV source at the address P hands them
        args += ["--kv-host", "$(POD_IP)"]
    if layout.model:
        args += ["--model", layout.model]
    if tp > 1:
        args += ["--tensor-parallel-size", str(tp)]
    if layout.cpu:  # the container sees the node's cores; use what the pod was given
        args += ["--device", "cpu", "--cpu-threads", str(_cpus_per_rank(layout, opts))]
    if layout.kv_cache_memory:
        args += ["--kv-cache-memory", layout.kv_cache_memory]
    return args + layout.instance_args


def instance_deployment(role: str, layout: Layout, opts: KubeOptions) -> dict:
    """`count` pods of `role`, each one instance on `tp` GPUs of one node."""
    tp = getattr(layout, f"{role}_tp")
    memory_gib = _memory_per_rank_gib(layout, opts) * tp
    container = {
        "name": role, "image": opts.image, "imagePullPolicy": opts.image_pull_policy,
        "command": ["pdserve"], "args": instance_args(role, layout, opts),
        "ports": [{"name": PORT_NAME, "containerPort": layout.port, "protocol": "TCP"}],
        "env": [_pod_ip_env()] + _api_key_env(opts),
        "resources": _resources(_cpus_per_rank(layout, opts) * tp, memory_gib,
                                gpus=0 if layout.cpu else tp, cpu_limit=layout.cpu),
        # the model loads before /health answers: liveness waits for the first 200
        "startupProbe": _http_probe(period_s=PROBE_PERIOD_S, failures=math.ceil(
            opts.startup_timeout_s / PROBE_PERIOD_S)),
        "readinessProbe": _http_probe(period_s=5, failures=2),
        # 503 for good once the engine process died: a restart is the cure
        "livenessProbe": _http_probe(period_s=PROBE_PERIOD_S, failures=3),
        "volumeMounts": _secret_mounts() + [{"name": "shm", "mountPath": "/dev/shm"}]
        + _model_mounts(layout, opts),
    }
    # CPU KV caches, GPU staging buffers and NCCL live in /dev/shm (64 MiB by default)
    shm = {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{memory_gib}Gi"}}
    pod = _pod_spec(opts, [container], _secret_volumes(opts) + [shm]
                    + _model_volumes(layout, opts), gpu=not layout.cpu)
    return _deployment(opts, role, getattr(layout, role), pod, surge=False)


def instance_service(role: str, layout: Layout, opts: KubeOptions) -> dict:
    """Headless: a name per pod for DNS and scraping; clients never call instances."""
    return _service(opts, role, f"{opts.name}-{role}", layout.port, {"clusterIP": "None"})


# ---- monitoring ---------------------------------------------------------------------------


def service_monitor(layout: Layout, opts: KubeOptions) -> dict:
    """Prometheus operator: scrape /metrics of the router and of every instance."""
    endpoint: dict = {"port": PORT_NAME, "path": "/metrics", "interval": opts.scrape_interval}
    if opts.api_key_secret:  # /metrics takes the clients' API key where one is set
        endpoint["authorization"] = {"type": "Bearer", "credentials": {
            "name": opts.api_key_secret, "key": API_KEY_KEY}}
    selector = {"matchLabels": {"app.kubernetes.io/instance": opts.name},
                "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In",
                                      "values": ["router", *roles_of(layout)]}]}
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": _meta(opts, opts.name, "monitoring"),
            "spec": {"selector": selector, "endpoints": [endpoint]}}


# ---- shared pieces ------------------------------------------------------------------------


def labels(opts: KubeOptions, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "pdserve", "app.kubernetes.io/instance": opts.name,
            "app.kubernetes.io/component": component}


def _meta(opts: KubeOptions, name: str, component: str) -> dict:
    meta: dict = {"name": name, "labels": labels(opts, component)}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    return meta


def _selector(opts: KubeOptions, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": opts.name, "app.kubernetes.io/component": component}


def _deployment(opts: KubeOptions, component: str, replicas: int, pod: dict,
                surge: bool = True) -> dict:
    spec: dict = {"replicas": replicas, "selector": {"matchLabels": _selector(opts, component)},
                  "template": {"metadata": {"labels": labels(opts, component)}, "spec": pod}}
    if not surge:  # a rollout must not need GPUs beyond the instances' own
        spec["strategy"] = {"type": "RollingUpdate",
                            "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(opts, f"{opts.name}-{component}", component), "spec": spec}


def _service(opts: KubeOptions, component: str, name: str, port: int, extra: dict,
             selector_component: str | None = None) -> dict:
    spec = {**extra, "selector": _selector(opts, selector_component or component),
            "ports": [{"name": PORT_NAME, "port": port, "targetPort": PORT_NAME,
                       "protocol": "TCP"}]}
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(opts, name, component),
            "spec": spec}


def _pod_spec(opts: KubeOptions, containers: list[dict], volumes: list[dict],
              gpu: bool = False) -> dict:
    pod: dict = {"containers": containers, "volumes": volumes,
                 # the drain (requests in flight finish), then the engine's stop
                 "terminationGracePeriodSeconds": math.ceil(opts.drain_timeout_s) + STOP_GRACE_S}
    if gpu:  # GPU nodes are commonly tainted so that only GPU pods land there
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists",
                               "effect": "NoSchedule"}]
        if opts.node_selector:
            pod["nodeSelector"] = dict(opts.node_selector)
    return pod


def _http_probe(period_s: int, failures: int) -> dict:
    return {"httpGet": {"path": "/health", "port": PORT_NAME}, "periodSeconds": period_s,
            "timeoutSeconds": 5, "failureThreshold": failures}


def _resources(cpus: int, memory_gib: int, gpus: int, cpu_limit: bool = False) -> dict:
    requests = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    limits: dict = {"memory": f"{memory_gib}Gi"}
    if cpu_limit:
        limits["cpu"] = str(cpus)
    if gpus:
        limits[GPU_RESOURCE] = gpus  # extended resources: requests default to limits
    return {"requests": requests, "limits": limits}


def _pod_ip_env() -> dict:
    return {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def _api_key_env(opts: KubeOptions) -> list[dict]:
    if not opts.api_key_secret:
        return []
    return [{"name": "PDSERVE_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": opts.api_key_secret, "key": API_KEY_KEY}}}]


def _secret_volumes(opts: KubeOptions) -> list[dict]:
    return [{"name": "deployment-secret", "secret": {
        "secretName": opts.secret, "defaultMode": 0o440,  # owner and fsGroup
        "items": [{"key": SECRET_KEY, "path": SECRET_KEY}]}}]


def _secret_mounts() -> list[dict]:
    return [{"name": "deployment-secret", "mountPath": SECRET_DIR, "readOnly": True}]


def _model_volumes(layout: Layout, opts: KubeOptions, tokenizes: bool = False) -> list[dict]:
    if not _mounts_model(layout, opts, tokenizes):
        return []
    return [{"name": "model", "persistentVolumeClaim": {"claimName": opts.model_pvc,
                                                        "readOnly": True}}]


def _model_mounts(layout: Layout, opts: KubeOptions, tokenizes: bool = False) -> list[dict]:
    if not _mounts_model(layout, opts, tokenizes):
        return []
    return [{"name": "model", "mountPath": MODEL_DIR, "readOnly": True}]


def _mounts_model(layout: Layout, opts: KubeOptions, tokenizes: bool) -> bool:
    """Instances read the model; the router only where it gets it as --tokenizer."""
    if not opts.model_pvc:
        return False
    return not tokenizes or layout.routing_policy != "least_loaded"


def _cpus_per_rank(layout: Layout, opts: KubeOptions) -> int:
    return opts.cpus_per_rank or (2 if layout.cpu else 4)


def _memory_per_rank_gib(layout: Layout, opts: KubeOptions) -> int:
    return opts.memory_per_rank_gib or (4 if layout.cpu else 32)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)

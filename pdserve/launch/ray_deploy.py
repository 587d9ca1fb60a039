"""`pdserve up --ray`: the layout of `pdserve up`, placed on a Ray cluster.

Each server (every instance, and the router) is a Ray core actor (ray_server.ServerActor)
that owns one `pdserve` process, in a placement group of its own that reserves what the
server uses: a CPU instance `num_cpus` CPUs, a GPU instance `tp` GPUs in one bundle (so on
one node) and a CPU. Custom resources per role pin roles to nodes. The router starts first
on its node's IP (or --host); each instance then listens on its node's IP at a port free
there, joins the router (`serve --router`, heartbeats signed with the deployment secret)
and gets $PDSERVE_HOST_ID = its Ray node id, so a decode instance pulls KV over TCP from a
prefill instance on another node and over shared memory (or CUDA IPC) on its own.

Why core actors and not Ray Serve: a pdserve instance is a stateful server with its own
HTTP front, engine process, KV source socket and drain; Serve's replicas, autoscaler and
HTTP proxy would wrap each in a second front and restart them on their own, which the
router (the deployment's only front) and P/D leases cannot follow. Actors give exactly
what is needed: placement, addresses, liveness.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdserve.launch.cli import router_flags, serve_flags
from pdserve.launch.credentials import Credentials
from pdserve.launch.layout import Layout, plan
from pdserve.launch.ray_server import Placement, ServerActor, Started
from pdserve.launch.ray_spec import RaySpec
from pdserve.switches import env_name

NAMESPACE = "pdserve"  # the actors' Ray namespace: `ray list actors` shows them by name
STOP_GRACE_S = 15.0
CALL_TIMEOUT_S = 30.0  # one call to an actor (it answers at once unless its node is gone)


@dataclass
class RayServer:
    """One server of the deployment as the driver sees it."""

    name: str
    role: str  # "prefill", "decode", "colocated" or "router"
    bundle: dict[str, float]
    serve_args: list[str]  # `pdserve ARGS`, less --host and --port
    pg: PlacementGroup | None = None
    actor: object | None = None  # the ServerActor handle
    placement: Placement | None = None
    started: Started | None = None
    reported_dead: bool = False

    @property
    def url(self) -> str:
        return self.started.url if self.started else "-"


@dataclass
class RayDeployment:
    """Every server of one `pdserve up --ray`: instances, then the router (last)."""

    layout: Layout
    spec: RaySpec
    creds: Credentials
    log_dir: str
    drain_timeout_s: float | None = None
    deployment_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    servers: list[RayServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        on_gpu = not self.layout.cpu and ray.cluster_resources().get("GPU", 0) > 0
        instances = plan(self.layout, self.layout.gpus_needed() if on_gpu else 0)
        for inst in instances:
            args = ["serve", "--role", inst.role,
                    *serve_flags(inst, self.layout, self.creds, self.drain_timeout_s)]
            if not on_gpu:  # the engine uses the CPUs its bundle holds
                args += ["--cpu-threads", str(max(int(self.spec.num_cpus), 1))]
            self.servers.append(RayServer(inst.name, inst.role,
                                          self.spec.bundle(inst.role, inst.tp if on_gpu else 0),
                                          args))
        router = ["router", *router_flags(self.layout, self.creds, self.drain_timeout_s)]
        self.servers.append(RayServer("router", "router", self.spec.bundle("router", 0), router))

    def shortfall(self, cluster: dict[str, float]) -> str:
        """What the servers reserve beyond the cluster's total ('' if it has enough)."""
        need: dict[str, float] = {}
        for s in self.servers:
            for name, amount in s.bundle.items():
                need[name] = need.get(name, 0.0) + amount
        return ", ".join(f"{name} {amount - cluster.get(name, 0.0):g}"
                         for name, amount in need.items() if amount > cluster.get(name, 0.0))

    @property
    def router(self) -> RayServer:
        return self.servers[-1]

    @property
    def instances(self) -> list[RayServer]:
        return self.servers[:-1]

    # ---- start ---------------------------------------------------------------------------

    def start(self, timeout_s: float, router_host: str | None = None) -> None:
        """Reserve, place, start the router, then the instances (they join it); return once
        the router lists every instance as healthy. Raises RuntimeError naming what failed."""
        deadline = time.monotonic() + timeout_s
        self._reserve(deadline)
        router = self.router
        self._start(router, router_host or router.placement.node_ip, self.layout.port)
        self._wait_healthy([router], deadline, ok=(200, 503))  # 503: no instance yet
        for inst in self.instances:
            inst.serve_args += ["--router", router.url, *self.layout.instance_args]
            self._start(inst, inst.placement.node_ip, None)
        self._wait_healthy(self.instances, deadline, ok=(200,))
        self._wait_registered(deadline)

    def _reserve(self, deadline: float) -> None:
        """A placement group per server, then its actor in it; learn where each landed."""
        for s in self.servers:
            s.pg = placement_group([s.bundle], strategy="STRICT_PACK",
                                   name=self.actor_name(s))
        for s in self.servers:
            try:
                ray.get(s.pg.ready(), timeout=max(deadline - time.monotonic(), 1.0))
            except GetTimeoutError:
                raise RuntimeError(f"{s.name}: the cluster cannot reserve {s.bundle} (see "
                                   "`ray status`; --ray-num-cpus and --ray-resources "
                                   "choose what each server asks for)") from None
        actor_class = ray.remote(ServerActor)
        for s in self.servers:
            s.actor = actor_class.options(
                num_cpus=s.bundle.get("CPU", 0), num_gpus=s.bundle.get("GPU", 0),
                name=self.actor_name(s), namespace=NAMESPACE, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    s.pg, placement_group_bundle_index=0),
            ).remote(s.name, self.log_dir)
        for s in self.servers:
            s.placement = ray.get(s.actor.placement.remote(), timeout=CALL_TIMEOUT_S)

    def actor_name(self, s: RayServer) -> str:
        return f"pdserve-{self.deployment_id}-{s.name}"

    def _start(self, s: RayServer, host: str, port: int | None) -> None:
        # the secret travels as a call argument, into the child's environment only
        env = self.creds.env()
        if s.role != "router":
            env[env_name("host_id")] = s.placement.node_id
        s.started = ray.get(s.actor.start.remote(s.serve_args, env, host, port),
                            timeout=CALL_TIMEOUT_S)

    def _wait_healthy(self, servers: list[RayServer], deadline: float,
                      ok: tuple[int, ...]) -> None:
        waiting = list(servers)
        while waiting:
            for s in list(waiting):
                if self.exit_code(s) is not None:
                    s.reported_dead = True
                    raise RuntimeError(self.death_message(s, "while starting"))
                if ray.get(s.actor.healthy.remote(ok), timeout=CALL_TIMEOUT_S):
                    waiting.remove(s)
            if waiting and time.monotonic() > deadline:
                raise RuntimeError("not healthy in time: " + ", ".join(s.name for s in waiting))
            time.sleep(0.5)

    def _wait_registered(self, deadline: float) -> None:
        """Until the router lists every instance as healthy (they joined by heartbeat)."""
        want = {s.url for s in self.instances}
        while True:
            healthy = {i["url"] for i in self.router_instances() if i.get("healthy")}
            if want <= healthy:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router lists {sorted(healthy)}, not {sorted(want)}")
            time.sleep(0.5)

    def router_instances(self) -> list[dict]:
        """The router's /instances (a signed internal call); [] if it does not answer."""
        from pdserve.security import sign_request

        try:
            resp = httpx.get(self.router.url + "/instances", timeout=5,
                             headers=sign_request(self.creds.secret, "GET", "/instances"))
            return resp.json()["instances"] if resp.status_code == 200 else []
        except (httpx.HTTPError, ValueError, KeyError):
            return []

    # ---- watch ---------------------------------------------------------------------------

    def exit_code(self, s: RayServer) -> int | str | None:
        """None while it serves; its exit code, or why its actor is gone."""
        if s.actor is None:
            return "never started"
        try:
            return ray.get(s.actor.exit_code.remote(), timeout=CALL_TIMEOUT_S)
        except RayActorError as exc:
            return f"its Ray actor died ({type(exc).__name__}: node lost or actor killed)"
        except GetTimeoutError:
            return "its Ray actor does not answer (node unreachable?)"

    def death_message(self, s: RayServer, when: str = "") -> str:
        code = self.exit_code(s)
        how = f"exited with code {code}" if isinstance(code, int) else str(code)
        node = s.placement.node_ip if s.placement else "?"
        pid = s.started.pid if s.started else "?"
        head = " ".join(filter(None, [f"{s.name} (pid {pid} on node {node}, {s.url}) {how}",
                                      when]))
        tail = ""
        try:
            text = ray.get(s.actor.log_tail.remote(), timeout=CALL_TIMEOUT_S)
            tail = "".join(f"\n  | {line}" for line in text.splitlines())
        except (RayActorError, GetTimeoutError):
            pass
        log = s.started.log_path if s.started else "-"
        return f"{head}\n  log: {log} (on {node}){tail}"

    def watch(self, on_death: Callable[[RayServer], None], interval_s: float = 1.0) -> None:
        """Report each death once; return when the router or every instance is gone."""
        while True:
            for s in self.servers:
                if not s.reported_dead and self.exit_code(s) is not None:
                    s.reported_dead = True
                    on_death(s)
            if self.router.reported_dead or all(s.reported_dead for s in self.instances):
                return
            time.sleep(interval_s)

    # ---- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Router first (it drains), then every instance at once (each drains, then stops
        its engine; its actor SIGKILLs what outlives the drain and unlinks its node's stale
        KV files); then the actors and placement groups go."""
        grace = (self.drain_timeout_s or 0.0) + STOP_GRACE_S
        for group in ([self.router], self.instances):
            calls = [s.actor.stop.remote(grace) for s in group if s.actor is not None]
            for call in calls:
                try:
                    ray.get(call, timeout=grace + CALL_TIMEOUT_S)
                except (RayActorError, GetTimeoutError):
                    pass  # its process was told by the actor's death (PDEATHSIG)
        for s in self.servers:
            if s.actor is not None:
                ray.kill(s.actor)
            if s.pg is not None:
                remove_placement_group(s.pg)

"""Instances join by POST /register, stay by heartbeat, and are dropped when it lapses;
`pdserve serve --router URL` does all of it itself."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from pdserve.router.heartbeat import keep_registered
from pdserve.security import DeploymentSecret
from tests.router.cluster import (
    GREEDY,
    internal,
    metric,
    start_instance,
    start_router,
    wait_healthy,
)
from tests.router.conftest import INSTANCE_FLAGS

TTL_S = 2.0


def instances(router) -> list[dict]:
    return internal("GET", router.url, "/instances").json()["instances"]


@contextmanager
def heartbeats(router_url: str, url: str) -> Iterator[None]:
    """The instance side's heartbeat loop, in a thread, for the duration of the block."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(keep_registered(router_url, url, "colocated",
                                            DeploymentSecret.from_env(), interval_s=0.5,
                                            deregister_on_exit=False))

    def run() -> None:
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(timeout=10)
        loop.close()


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_registered_instance_serves_until_its_heartbeat_lapses(fleet, routers_tmp):
    router = start_router(routers_tmp, flags=("--heartbeat-ttl", str(TTL_S)))
    try:
        assert httpx.get(router.url + "/health", timeout=10).status_code == 503
        reg = internal("POST", router.url, "/register",
                       {"url": fleet.c0.url, "role": "colocated"})
        assert reg.status_code == 200
        assert reg.json()["instance"]["healthy"]  # checked on the spot
        body = {"prompt": "Hello", "max_tokens": 3, **GREEDY}
        assert httpx.post(router.url + "/v1/completions", json=body,
                          timeout=60).status_code == 200
        with heartbeats(router.url, fleet.c0.url):  # they keep it past the TTL
            time.sleep(TTL_S * 1.5)
            assert [i["url"] for i in instances(router)] == [fleet.c0.url]
        assert [i["url"] for i in instances(router)] == [fleet.c0.url]
        assert wait_until(lambda: not instances(router), TTL_S + 3)  # heartbeats stopped
        assert httpx.get(router.url + "/health", timeout=10).status_code == 503
    finally:
        router.stop()


def test_deregister_and_bad_registrations(fleet, routers_tmp):
    router = start_router(routers_tmp)
    try:
        bad = internal("POST", router.url, "/register", {"url": fleet.c0.url, "role": "x"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert internal("POST", router.url, "/register", {"role": "decode"}).status_code == 400
        internal("POST", router.url, "/register", {"url": fleet.c0.url, "role": "colocated"})
        assert len(instances(router)) == 1
        gone = internal("POST", router.url, "/deregister", {"url": fleet.c0.url})
        assert gone.json()["removed"] is True and instances(router) == []
    finally:
        router.stop()


def joined(router, instance, role: str) -> bool:
    return any(i["url"] == instance.url and i["role"] == role and i["healthy"]
               for i in instances(router))


def test_instance_started_with_router_joins_serves_and_is_dropped_when_killed(routers_tmp):
    router = start_router(routers_tmp, flags=("--heartbeat-ttl", str(TTL_S)))
    inst = start_instance(routers_tmp, "colocated", "--router", router.url, *INSTANCE_FLAGS)
    try:
        wait_healthy(inst)
        # heartbeats come faster than the short TTL, so it stays listed past it
        assert wait_until(lambda: joined(router, inst, "colocated"), 10)
        time.sleep(TTL_S * 1.5)
        assert joined(router, inst, "colocated")
        body = {"prompt": "Hello", "max_tokens": 3, **GREEDY}
        resp = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        assert metric(inst.url, "vllm:request_success_total", finished_reason="length") == 1
        killed = time.monotonic()
        inst.kill()  # SIGKILL: no deregistration; the router notices by heartbeat and health
        assert wait_until(lambda: not instances(router), TTL_S + 5)
        assert time.monotonic() - killed > TTL_S / 2  # by the TTL, not at once
        assert httpx.get(router.url + "/health", timeout=10).status_code == 503
    finally:
        inst.stop()
        router.stop()


def test_instance_started_with_router_leaves_at_once_on_a_clean_stop(routers_tmp):
    ttl_s = 60.0  # long: leaving within seconds can only be the deregistration
    router = start_router(routers_tmp, flags=("--heartbeat-ttl", str(ttl_s)))
    inst = start_instance(routers_tmp, "decode", "--router", router.url, *INSTANCE_FLAGS)
    try:
        wait_healthy(inst)
        assert wait_until(lambda: joined(router, inst, "decode"), 10)
        inst.terminate()  # SIGTERM: uvicorn's graceful shutdown runs the lifespan's exit
        assert wait_until(lambda: not instances(router), 10)
        assert inst.proc.wait(timeout=20) == 0
    finally:
        inst.stop()
        router.stop()

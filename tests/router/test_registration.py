"""Instances join by POST /register, stay by heartbeat, and are dropped when it lapses."""

from __future__ import annotations

import time

import httpx

from tests.router.cluster import GREEDY, start_router

TTL_S = 2.0


def instances(router) -> list[dict]:
    return httpx.get(router.url + "/instances", timeout=10).json()["instances"]


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
        reg = httpx.post(router.url + "/register",
                         json={"url": fleet.c0.url, "role": "colocated"}, timeout=10)
        assert reg.status_code == 200
        assert reg.json()["instance"]["healthy"]  # checked on the spot
        body = {"prompt": "Hello", "max_tokens": 3, **GREEDY}
        assert httpx.post(router.url + "/v1/completions", json=body,
                          timeout=60).status_code == 200
        for _ in range(3):  # heartbeats keep it past the TTL
            time.sleep(TTL_S / 2)
            httpx.post(router.url + "/register", json={"url": fleet.c0.url,
                                                       "role": "colocated"}, timeout=10)
        assert [i["url"] for i in instances(router)] == [fleet.c0.url]
        assert wait_until(lambda: not instances(router), TTL_S + 3)  # heartbeats stopped
        assert httpx.get(router.url + "/health", timeout=10).status_code == 503
    finally:
        router.stop()


def test_deregister_and_bad_registrations(fleet, routers_tmp):
    router = start_router(routers_tmp)
    try:
        bad = httpx.post(router.url + "/register", json={"url": fleet.c0.url, "role": "x"},
                         timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert httpx.post(router.url + "/register", json={"role": "decode"},
                          timeout=10).status_code == 400
        httpx.post(router.url + "/register", json={"url": fleet.c0.url, "role": "colocated"},
                   timeout=10)
        assert len(instances(router)) == 1
        gone = httpx.post(router.url + "/deregister", json={"url": fleet.c0.url}, timeout=10)
        assert gone.json()["removed"] is True and instances(router) == []
    finally:
        router.stop()

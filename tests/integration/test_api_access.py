"""Who gets into the HTTP API, with a real node behind the real shipped nginx config.

"Another host" is really another address: a network namespace joined to this one by a veth
pair (10.200.X.1 here, 10.200.X.2 there). The cluster listens on every address (``0.0.0.0``),
so that nginx reaches the nodes over loopback as it does in the shipped setup (nginx next to
its nodes, a trusted proxy by default) and is also reachable from the namespace.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from realtime_dev.cluster import LocalCluster
from realtime_dev.processes import find_executable

KEY = "itest-" + uuid.uuid4().hex

# Runs inside the namespace: one HTTP request, its answer printed as JSON. urllib without the
# environment's proxies, so that nothing but the veth pair is in the way.
CLIENT = r"""
import json, sys, urllib.error, urllib.request
method, url, headers, body = json.loads(sys.argv[1])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
request = urllib.request.Request(url, method=method, headers=headers,
                                 data=None if body is None else json.dumps(body).encode())
try:
    response = opener.open(request, timeout=10)
except urllib.error.HTTPError as error:
    response = error
print(json.dumps({"status": response.status, "headers": dict(response.headers),
                  "body": response.read().decode("utf-8", "replace")}))
"""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)

    def error_code(self) -> str:
        assert self.headers.get("Content-Type", "").startswith("application/json"), self
        return self.json()["error"]["code"]


@dataclass
class OtherHost:
    """A network namespace with an address of its own; :meth:`request` runs from there."""

    namespace: str
    address: str        # the namespace's side of the veth pair
    peer_address: str   # this host's side: where the namespace reaches the cluster
    ip: str

    def request(self, method: str, url: str, headers: dict[str, str] | None = None,
                body: Any = None) -> Answer:
        argv = [self.ip, "netns", "exec", self.namespace, sys.executable, "-c", CLIENT,
                json.dumps([method, url, {"Content-Type": "application/json", **(headers or {})},
                            body])]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result.stderr
        return Answer(**json.loads(result.stdout))

    def url(self, local_url: str) -> str:
        """``local_url`` (a cluster URL on 127.0.0.1) as the namespace reaches it."""
        return f"http://{self.peer_address}:{urlsplit(local_url).port}"


def _free_subnet(ip: str) -> int:
    """X such that 10.200.X.0/30 is neither an address nor a route here yet."""
    taken = subprocess.run([ip, "-o", "addr"], capture_output=True, text=True, check=True).stdout
    taken += subprocess.run([ip, "route"], capture_output=True, text=True, check=True).stdout
    candidates = [x for x in range(256) if f"10.200.{x}." not in taken]
    assert candidates, "no free 10.200.X.0/30 subnet"
    return random.choice(candidates)


@pytest.fixture(scope="module")
def other_host(request) -> OtherHost:
    ip = find_executable("ip")
    suffix = uuid.uuid4().hex[:8]
    namespace, host_side, ns_side = f"rt-api-{suffix}", f"rtah{suffix}", f"rtan{suffix}"

    def remove() -> None:
        # Deleting the namespace deletes its end of the pair, and with it the other end; the
        # second command is for a setup that failed before the end was moved in there.
        subprocess.run([ip, "netns", "del", namespace], capture_output=True, check=False)
        subprocess.run([ip, "link", "del", host_side], capture_output=True, check=False)

    request.addfinalizer(remove)  # before anything is made: it runs even if setup fails
    subnet = _free_subnet(ip)
    here, there = f"10.200.{subnet}.1", f"10.200.{subnet}.2"
    in_ns = [ip, "netns", "exec", namespace, ip]
    for argv in ([ip, "netns", "add", namespace],
                 [ip, "link", "add", host_side, "type", "veth", "peer", "name", ns_side],
                 [ip, "link", "set", ns_side, "netns", namespace],
                 [ip, "addr", "add", f"{here}/30", "dev", host_side],
                 [ip, "link", "set", host_side, "up"],
                 [*in_ns, "addr", "add", f"{there}/30", "dev", ns_side],
                 [*in_ns, "link", "set", ns_side, "up"],
                 [*in_ns, "link", "set", "lo", "up"]):
        subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30)
    return OtherHost(namespace, there, here, ip)


def start_cluster(workdir, *node_args: str) -> LocalCluster:
    # 0.0.0.0: nginx and the node listen on every address; nginx proxies to 127.0.0.1.
    return LocalCluster(workdir=workdir, nodes=1, host="0.0.0.0", node_args=node_args).start()


@pytest.fixture(scope="module")
def open_cluster(tmp_path_factory):
    """No API key configured: the API answers loopback clients only."""
    cluster = start_cluster(tmp_path_factory.mktemp("open-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def keyed_cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("keyed-cluster"), "--api-key", KEY)
    yield cluster
    cluster.stop()


def node_url(cluster: LocalCluster) -> str:
    return cluster.node_urls["n1"]


# The probes: publish as anyone, read alice's notifications, disconnect her.
PROBES = [("POST", "/api/publish", {"channel": "user:alice", "data": "spoofed"}),
          ("GET", "/api/history/user:alice", None),
          ("POST", "/api/disconnect", {"user": "alice"}),
          ("GET", "/api/info", None)]


def test_the_other_host_is_really_another_address(open_cluster, other_host):
    assert not other_host.address.startswith("127.")
    # it reaches nginx (and the node behind it) fine: what follows is the API's rule
    answer = other_host.request("GET", other_host.url(open_cluster.url) + "/readyz")
    assert answer.status == 200, answer


@pytest.mark.parametrize("method,path,body", PROBES)
def test_without_keys_another_host_is_refused_through_nginx(open_cluster, other_host, method,
                                                             path, body):
    answer = other_host.request(method, other_host.url(open_cluster.url) + path, body=body)
    assert answer.status == 403, answer
    assert answer.error_code() == "forbidden"


def test_without_keys_another_host_is_refused_straight_at_a_node(open_cluster, other_host):
    answer = other_host.request("GET", other_host.url(node_url(open_cluster)) + "/api/info")
    assert answer.status == 403 and answer.error_code() == "forbidden"


def test_without_keys_a_forged_forwarded_for_from_another_host_is_refused(open_cluster,
                                                                          other_host):
    forged = {"X-Forwarded-For": "127.0.0.1"}
    for url in (open_cluster.url, node_url(open_cluster)):
        answer = other_host.request("GET", other_host.url(url) + "/api/info", forged)
        assert answer.status == 403 and answer.error_code() == "forbidden", (url, answer)


def test_without_keys_loopback_clients_are_answered_directly_and_through_nginx(open_cluster):
    # The README's curl example, straight at the node.
    response = requests.post(node_url(open_cluster) + "/api/publish",
                             json={"channel": "user:alice", "data": {"title": "Hello"}},
                             timeout=10)
    assert response.status_code == 200 and response.json()["offset"] >= 1
    assert requests.get(open_cluster.url + "/api/info", timeout=10).status_code == 200


def test_nginx_replaces_a_forwarded_for_sent_by_the_client(open_cluster):
    # A local client claiming another address: nginx replaces the claim with the address it
    # saw (127.0.0.1), so the node answers. Had nginx appended its own entry instead, the
    # node would see "203.0.113.9, 127.0.0.1" and refuse the rightmost untrusted address.
    response = requests.get(open_cluster.url + "/api/info",
                            headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
    assert response.status_code == 200, response.text


def test_with_keys_another_host_needs_a_valid_key_through_nginx(keyed_cluster, other_host):
    url = other_host.url(keyed_cluster.url)
    for headers in ({}, {"Authorization": "apikey wrong"}, {"Authorization": f"Bearer {KEY}"}):
        answer = other_host.request("GET", url + "/api/history/user:alice", headers)
        assert answer.status == 401, (headers, answer)
        assert answer.error_code() == "unauthorized"
        assert answer.headers["WWW-Authenticate"] == "apikey"
    key = {"Authorization": f"apikey {KEY}"}
    answer = other_host.request("POST", url + "/api/publish", key,
                                {"channel": "user:alice", "data": "from a backend"})
    assert answer.status == 200, answer
    answer = other_host.request("GET", url + "/api/history/user:alice", key)
    assert answer.status == 200
    assert [p["data"] for p in answer.json()["publications"]][-1] == "from a backend"


def test_with_keys_loopback_needs_the_key_too(keyed_cluster):
    for url in (keyed_cluster.url, node_url(keyed_cluster)):
        response = requests.get(url + "/api/info", timeout=10)
        assert response.status_code == 401, url
        assert response.json()["error"]["code"] == "unauthorized"
        assert requests.get(url + "/api/info", headers={"Authorization": f"apikey {KEY}"},
                            timeout=10).status_code == 200


def test_a_backend_publishing_hard_from_one_address_is_not_rate_limited(keyed_cluster):
    """Through nginx's per-address limits: 8 keep-alive connections, 1,600 publishes flat out."""
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def publish(n: int) -> None:
        with requests.Session() as session:
            session.headers["Authorization"] = f"apikey {KEY}"
            for i in range(200):
                status = session.post(keyed_cluster.url + "/api/publish",
                                      json={"channel": f"load-{n}", "data": i},
                                      timeout=10).status_code
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == {200: 1600}

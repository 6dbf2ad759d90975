"""nginx's per-address limits refuse with 429 and a JSON error, each where it belongs.

The shipped figures are far above what a test can reach quickly (see nginx/README.md), so each
test renders the shipped config with one limit turned down to almost nothing, runs a real nginx
on it in front of a real node, and goes past that limit. tests/integration/test_cluster.py and
test_api_access.py run ordinary traffic through the unchanged config.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from realtime_dev.nginx import nginx_command, render_nginx_config
from realtime_dev.processes import ManagedProcess, NodeProcess, find_executable, free_port
from tests.helpers import wait_until


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path_factory.mktemp("limits-node"), "n1").wait_ready()
    yield node
    node.stop()


def lowered(config: str, *, rate: tuple[str, str] | None = None,
            burst: tuple[str, int] | None = None, conn: tuple[str, int] | None = None) -> str:
    """``config`` with one zone's rate, one ``limit_req``'s burst or one ``limit_conn`` changed.

    ``rate=("zone", "1r/m")``, ``burst=("zone", 0)``, ``conn=("zone", 1)``. Fails unless the
    directive is there exactly once, so that a renamed zone cannot make a test pass vacuously.
    """
    changes = []
    if rate:
        changes.append((rf"(limit_req_zone \S+ zone={rate[0]}:\w+) rate=\S+;",
                        rf"\1 rate={rate[1]};"))
    if burst:
        changes.append((rf"(limit_req zone={burst[0]}) burst=\d+", rf"\1 burst={burst[1]}"))
    if conn:
        changes.append((rf"(limit_conn {conn[0]}) \d+;", rf"\1 {conn[1]};"))
    for pattern, replacement in changes:
        config, count = re.subn(pattern, replacement, config)
        assert count == 1, f"{pattern!r} matched {count} times"
    return config


@pytest.fixture
def nginx(node, tmp_path) -> Iterator[Callable[..., str]]:
    """``nginx(**lowered_args)``: start nginx in front of ``node``; return its URL."""
    started: list[ManagedProcess] = []

    def start(**changes) -> str:
        port = free_port()
        config = render_nginx_config({"n1": f"127.0.0.1:{node.port}"}, f"127.0.0.1:{port}",
                                     tmp_path)
        conf = tmp_path / "nginx.conf"
        conf.write_text(lowered(config, **changes))
        process = ManagedProcess("nginx", nginx_command(find_executable("nginx"), tmp_path, conf),
                                 tmp_path / "nginx.log")
        started.append(process)

        def listening() -> bool:
            assert process.alive(), process.log() + error_log(tmp_path)
            with socket.socket() as sock:
                # A TCP connect, not an HTTP request: that would spend the limits under test.
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, 10, interval=0.05, message="nginx to listen")
        return f"http://127.0.0.1:{port}"

    yield start
    for process in started:
        process.stop()


def error_log(prefix: Path) -> str:
    path = prefix / "nginx-error.log"
    return path.read_text() if path.exists() else ""


def assert_rate_limited(response: requests.Response) -> None:
    assert response.status_code == 429, (response.status_code, response.text)
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "rate_limited" and error["message"]
    assert response.headers["Retry-After"] == "1"


def first_refusal(request: Callable[[], requests.Response], what: str) -> requests.Response:
    """Repeat ``request`` until it is refused with 429; that response."""
    responses = []

    def refused() -> bool:
        # (A Response is falsy when its status is 4xx: it cannot be wait_until's value.)
        responses.append(request())
        return responses[-1].status_code == 429

    wait_until(refused, message=what)
    return responses[-1]


def handshake(url: str, **kwargs) -> requests.Response:
    return requests.get(url + "/socket.io/?EIO=4&transport=polling", timeout=10, **kwargs)


def open_session(url: str) -> str:
    """A long-polling session through nginx, connected to namespace /; its sid."""
    response = handshake(url)
    assert response.status_code == 200, response.text
    sid = re.search(r'"sid":"([^"]+)"', response.text).group(1)
    session_url = f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}"
    assert requests.post(session_url, data="40", timeout=10).text == "ok"
    assert requests.get(session_url, timeout=10).text.startswith("40")
    return sid


def test_api_requests_past_the_per_address_rate_and_burst_get_429_with_a_json_error(
        nginx, tmp_path):
    url = nginx(rate=("realtime_http_requests", "1r/m"), burst=("realtime_http_requests", 2))
    # the rate, plus a burst of 2
    for _ in range(3):
        assert requests.get(url + "/api/info", timeout=10).status_code == 200
    assert_rate_limited(requests.get(url + "/api/info", timeout=10))
    assert_rate_limited(requests.post(url + "/api/publish", json={"channel": "c", "data": 1},
                                      timeout=10))
    assert "limiting requests" in error_log(tmp_path)
    # Socket.IO has budgets of its own
    assert handshake(url).status_code == 200


def test_handshakes_past_the_per_address_rate_get_429_while_sessions_carry_on(nginx):
    url = nginx(rate=("realtime_handshakes", "1r/m"), burst=("realtime_handshakes", 1))
    sid = open_session(url)
    assert handshake(url).status_code == 200  # the burst of 1
    assert_rate_limited(handshake(url))
    # a WebSocket without a sid is a handshake too
    assert_rate_limited(requests.get(url + "/socket.io/?EIO=4&transport=websocket", timeout=10,
                                     headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                              "Sec-WebSocket-Version": "13",
                                              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}))
    # ...and so is a sid that names no node, which would start a new session
    assert_rate_limited(requests.get(url + "/socket.io/?EIO=4&transport=polling&sid=nonsense",
                                     timeout=10))
    # the session that exists is not held back: its requests are no handshakes
    session_url = f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}"
    assert requests.post(session_url, data='421["history",{"channel":"x"}]',
                         timeout=10).text == "ok"
    assert requests.get(session_url, timeout=10).text.startswith('431[{"ok":true')
    # pages and the API have budgets of their own
    assert requests.get(url + "/api/info", timeout=10).status_code == 200


def test_socketio_requests_past_the_per_address_rate_get_429(nginx):
    url = nginx(rate=("realtime_socketio_requests", "1r/m"),
                burst=("realtime_socketio_requests", 3))
    sid = open_session(url)  # 3 requests: the handshake, the CONNECT, the GET of its answer
    session_url = f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}"
    assert requests.post(session_url, data='42["history",{"channel":"x"}]',
                         timeout=10).text == "ok"
    assert_rate_limited(requests.get(session_url, timeout=10))
    assert requests.get(url + "/api/info", timeout=10).status_code == 200


def test_socketio_connections_past_the_per_address_cap_get_429_until_one_closes(nginx):
    url = nginx(conn=("realtime_socketio_conn", 1))
    sid = open_session(url)
    # A long-polling GET with nothing to deliver waits (until the next ping, 25 s away):
    # one connection in use for as long as it waits.
    held = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    try:
        held.sendall(f"GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\n"
                     f"Host: test\r\n\r\n".encode())
        # nginx counts the held request once it has read its headers: wait until it has
        assert_rate_limited(first_refusal(lambda: handshake(url), "the held request to count"))
    finally:
        held.close()
    wait_until(lambda: handshake(url).status_code == 200, message="the count to go down")


def test_concurrent_api_requests_past_the_per_address_cap_get_429(nginx):
    url = nginx(conn=("realtime_http_conn", 1))
    held = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    try:
        # Headers read, body still to come: nginx is working on this request meanwhile.
        held.sendall(b"POST /api/publish HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        assert_rate_limited(first_refusal(lambda: requests.get(url + "/api/info", timeout=10),
                                          "the held request to count"))
        # WebSocket and long-polling clients are counted apart
        assert handshake(url).status_code == 200
    finally:
        held.close()
    wait_until(lambda: requests.get(url + "/api/info", timeout=10).status_code == 200,
               message="the count to go down")


def test_limits_are_per_address(nginx):
    url = nginx(rate=("realtime_http_requests", "1r/m"), burst=("realtime_http_requests", 1))
    port = int(url.rsplit(":", 1)[1])
    for _ in range(2):  # the rate, plus a burst of 1
        assert requests.get(url + "/api/info", timeout=10).status_code == 200
    assert_rate_limited(requests.get(url + "/api/info", timeout=10))
    # another loopback address is another client (nginx listens on 127.0.0.1: connect from
    # 127.0.0.2 with a socket bound there)
    with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


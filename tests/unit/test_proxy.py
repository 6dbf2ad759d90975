"""The backend proxy: request bodies, answers, every way a backend can fail, and its place in
the client protocol (a real node's sessions, the backend faked at the HTTP call)."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import time

import pytest

from realtime.app import create_app
from realtime.auth import Identity
from realtime.codecs import JSON, PacketType
from realtime.config import Config, ConfigError, NamespaceConfig
from realtime.errors import Forbidden, RealtimeError, Unavailable
from realtime.proxy import BackendFailure, BackendProxy, HttpPoster
from realtime.session import RequestContext
from tests.unit.sessions import SessionClient

BACKEND = "http://backend.test"


class FakeBackend:
    """A poster that records each call and answers what the test set (or raises it)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict, float]] = []
        self.answers: dict[str, object] = {}

    def __call__(self, url: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        self.calls.append((url, json.loads(body), timeout))
        answer = self.answers.get(url.rsplit("/", 1)[-1], (200, b'{"allow": true}'))
        if isinstance(answer, Exception):
            raise answer
        status, raw = answer  # type: ignore[misc]
        return status, raw if isinstance(raw, bytes) else json.dumps(raw).encode()

    def answer(self, kind: str, status: int, body: object) -> None:
        self.answers[kind] = (status, body)

    def bodies(self, kind: str) -> list[dict]:
        return [body for url, body, _ in self.calls if url.endswith("/" + kind)]


def proxy_config(**fields) -> Config:
    return Config(proxy_connect_url=f"{BACKEND}/connect",
                  proxy_subscribe_url=f"{BACKEND}/subscribe",
                  proxy_publish_url=f"{BACKEND}/publish", proxy_headers="Cookie, Authorization",
                  proxy_timeout=1.5, **fields)


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def proxy(backend):
    return BackendProxy(proxy_config(), poster=backend)


class FakeSession:
    client_id, user = "c1", "alice"
    request = RequestContext("10.0.0.7", None, {"cookie": "s=1", "authorization": "Bearer x"})


REQUEST = RequestContext("10.0.0.7", "https://app.test",
                         {"cookie": "s=1", "user-agent": "ua", "authorization": "Bearer x"},
                         {"transport": "polling", "EIO": "4"})


# -- request and answer mapping -----------------------------------------------------------------

def test_connect_posts_the_context_and_the_answer_is_the_identity(proxy, backend):
    backend.answer("connect", 200, {"user": "alice", "info": {"name": "A"},
                                    "channels": ["private:a*"]})
    identity = proxy.connect(REQUEST, {"session": "k"}, "c1")
    assert identity == Identity("alice", authenticated=True, info={"name": "A"},
                                grants=("private:a*",))
    url, body, timeout = backend.calls[0]
    assert (url, timeout) == (f"{BACKEND}/connect", 1.5)
    # only the listed headers, lower-case; never user-agent
    assert body == {"client": "c1", "transport": "polling", "peer": "10.0.0.7",
                    "headers": {"cookie": "s=1", "authorization": "Bearer x"},
                    "auth": {"session": "k"}}


def test_subscribe_posts_the_context_and_allow_true_allows(proxy, backend):
    proxy.subscribe(FakeSession(), "chat:room")
    assert backend.bodies("subscribe") == [{
        "client": "c1", "user": "alice", "channel": "chat:room", "peer": "10.0.0.7",
        "headers": {"cookie": "s=1", "authorization": "Bearer x"}}]


def test_publish_posts_the_data_and_follows_allow_or_a_rewrite(proxy, backend):
    assert proxy.publish(FakeSession(), "chat:room", {"text": "hi"}) == {"text": "hi"}
    assert backend.bodies("publish")[0] == {
        "client": "c1", "user": "alice", "channel": "chat:room", "data": {"text": "hi"},
        "peer": "10.0.0.7", "headers": {"cookie": "s=1", "authorization": "Bearer x"}}
    backend.answer("publish", 200, {"data": {"text": "hi", "clean": True}})
    assert proxy.publish(FakeSession(), "chat:room", {"text": "hi"}) == {"text": "hi",
                                                                          "clean": True}
    backend.answer("publish", 200, {"data": None})  # null is data like any other
    assert proxy.publish(FakeSession(), "chat:room", 1) is None


@pytest.mark.parametrize("status", [200, 403])
@pytest.mark.parametrize("code", ["unauthorized", "forbidden", "not_found", "too_large",
                                  "rate_limited", "bad_request", "unavailable"])
def test_an_error_answer_refuses_with_its_code_and_message(proxy, backend, code, status):
    for kind in ("connect", "subscribe", "publish"):
        backend.answer(kind, status, {"error": {"code": code, "message": "no " + kind}})
    calls = [lambda: proxy.connect(REQUEST, None, "c1"),
             lambda: proxy.subscribe(FakeSession(), "room"),
             lambda: proxy.publish(FakeSession(), "room", 1)]
    for kind, call in zip(("connect", "subscribe", "publish"), calls, strict=True):
        with pytest.raises(RealtimeError) as refused:
            call()
        assert (refused.value.code, refused.value.message) == (code, "no " + kind)


@pytest.mark.parametrize("error", [{"code": "internal"}, {"code": "teapot"}, {"code": 3},
                                   {}, "no", None])
def test_an_error_with_a_code_outside_the_hierarchy_refuses_as_forbidden(proxy, backend,
                                                                           error):
    backend.answer("subscribe", 200, {"error": error or {}} if error is None else
                   {"error": error})
    with pytest.raises(Forbidden):
        proxy.subscribe(FakeSession(), "room")


def test_a_long_error_message_is_cut_and_allow_false_refuses_as_forbidden(proxy, backend):
    backend.answer("subscribe", 200, {"error": {"code": "forbidden", "message": "x" * 5000}})
    with pytest.raises(Forbidden) as refused:
        proxy.subscribe(FakeSession(), "room")
    assert refused.value.message == "x" * 200
    backend.answer("subscribe", 200, {"allow": False})
    with pytest.raises(Forbidden):
        proxy.subscribe(FakeSession(), "room")


# -- every way a backend fails: unavailable, never a traceback ----------------------------------

FAILURES = {
    "timeout": BackendFailure("no answer within 1.5 s"),
    "refused": ConnectionRefusedError(111, "Connection refused"),
    "500": (500, {"error": {"code": "forbidden"}}),  # a 5xx is a failure whatever it says
    "502 html": (502, b"<html>bad gateway</html>"),
    "redirect": (302, b""),
    "not json": (200, b"<html>login</html>"),
    "json list": (200, [1, 2]),
    "json string": (200, "allow"),
    "no known shape": (200, {"ok": True}),
    "4xx without error": (401, {"detail": "login"}),
}


@pytest.mark.parametrize("failure", FAILURES.values(), ids=FAILURES.keys())
def test_a_backend_that_fails_makes_every_call_unavailable(proxy, backend, failure):
    for kind in ("connect", "subscribe", "publish"):
        backend.answers[kind] = failure
    # a connect answer of no known shape has no user: no identity either
    for call in (lambda: proxy.connect(REQUEST, None, "c1"),
                 lambda: proxy.subscribe(FakeSession(), "room"),
                 lambda: proxy.publish(FakeSession(), "room", 1)):
        with pytest.raises(Unavailable) as failed:
            call()
        assert failed.value.temporary


@pytest.mark.parametrize("answer", [
    {"user": ""}, {"user": "u" * 65}, {"user": 7}, {"allow": True},
    {"user": "a", "info": "text"}, {"user": "a", "info": {"x": "y" * 3000}},
    {"user": "a", "channels": "chat:*"}, {"user": "a", "channels": [""]},
    {"user": "a", "channels": ["c"] * 257}])
def test_a_connect_answer_that_is_not_an_identity_is_unavailable(proxy, backend, answer):
    backend.answer("connect", 200, answer)
    with pytest.raises(Unavailable):
        proxy.connect(REQUEST, None, "c1")


def test_failures_are_logged_at_most_once_per_kind_and_interval(proxy, backend, caplog):
    backend.answers["subscribe"] = backend.answers["publish"] = (500, b"")
    with caplog.at_level(logging.WARNING, "realtime.proxy"):
        for _ in range(5):
            for call in (lambda: proxy.subscribe(FakeSession(), "room"),
                         lambda: proxy.publish(FakeSession(), "room", 1)):
                with pytest.raises(Unavailable):
                    call()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "status 500" in lines[0]
    assert all(record.exc_info is None for record in caplog.records)  # no traceback


# -- which backend: the node's, or the namespace's ----------------------------------------------

def test_a_namespace_overrides_the_nodes_backend_or_turns_it_off(backend):
    config = proxy_config(namespaces={
        "chat": NamespaceConfig(proxy_subscribe_url="http://chat.test/s"),
        "open": NamespaceConfig(proxy_subscribe_url="", proxy_publish_url="")})
    proxy = BackendProxy(config, poster=backend)
    assert proxy.subscribe_url("chat:1") == "http://chat.test/s"
    assert proxy.publish_url("chat:1") == f"{BACKEND}/publish"  # not overridden: the node's
    assert proxy.subscribe_url("open:1") == proxy.publish_url("open:1") == ""
    assert proxy.subscribe_url("lobby") == f"{BACKEND}/subscribe"
    only_one = Config(namespaces={"chat": NamespaceConfig(proxy_publish_url="http://c.test/")})
    assert BackendProxy.from_config(only_one).publish_url("chat:x") == "http://c.test/"
    assert BackendProxy.from_config(only_one).publish_url("lobby") == ""
    assert BackendProxy.from_config(Config()) is None


def test_proxy_settings_are_validated_and_read_from_a_config_file(tmp_path):
    for bad in ({"proxy_connect_url": "backend:80"}, {"proxy_timeout": 0},
                {"namespaces": {"chat": NamespaceConfig(proxy_publish_url="ftp://x")}}):
        with pytest.raises(ConfigError):
            Config(**bad)
    path = tmp_path / "realtime.toml"
    path.write_text('proxy_subscribe_url = "http://a.test/s"\nproxy_headers = "Cookie"\n'
                    '[namespaces.chat]\nproxy-publish-url = "http://b.test/p"\n')
    config = Config.load(config_file=str(path), environ={})
    assert config.proxy_subscribe_url == "http://a.test/s"
    assert config.proxy_header_names == ("cookie",)
    assert config.namespace("chat").proxy_publish_url == "http://b.test/p"
    assert config.namespace("chat").join_leave  # the built-in chat rules stay
    assert Config.load({"proxy_timeout": "0.25"}, environ={}).proxy_timeout == 0.25


# -- HttpPoster: the real HTTP client -----------------------------------------------------------

class _Backend(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    delay = 0.0
    padding = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.delay)
        answer = json.dumps({"port": self.client_address[1], "got": json.loads(body),
                             "padding": "p" * self.padding}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_backend():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_http_poster_keeps_its_connection_alive_between_calls(http_backend):
    post = HttpPoster()
    url = f"http://127.0.0.1:{http_backend.server_port}/subscribe"
    answers = [json.loads(post(url, b'{"n": %d}' % n, 2.0)[1]) for n in range(3)]
    assert [a["got"] for a in answers] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert len({a["port"] for a in answers}) == 1  # one client port: one TCP connection


def test_an_answer_over_the_limit_fails_and_leaves_nothing_for_the_next_call(http_backend,
                                                                             monkeypatch):
    post = HttpPoster()
    url = f"http://127.0.0.1:{http_backend.server_port}/"
    monkeypatch.setattr(_Backend, "padding", 2 * 1024 * 1024)
    with pytest.raises(BackendFailure, match="over"):
        post(url, b'{"n": 1}', 5.0)
    monkeypatch.setattr(_Backend, "padding", 0)
    status, raw = post(url, b'{"n": 2}', 5.0)
    assert status == 200 and json.loads(raw)["got"] == {"n": 2}


def test_the_http_poster_fails_on_a_slow_or_closed_backend(http_backend, monkeypatch):
    monkeypatch.setattr(_Backend, "delay", 1.0)
    url = f"http://127.0.0.1:{http_backend.server_port}/"
    started = time.monotonic()
    with pytest.raises(BackendFailure, match=r"no answer within 0\.2 s"):
        HttpPoster()(url, b"{}", 0.2)
    assert time.monotonic() - started < 0.9
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = unused.getsockname()[1]
    with pytest.raises(BackendFailure, match="connection refused"):
        HttpPoster()(f"http://127.0.0.1:{closed}/", b"{}", 1.0)


# -- in the client protocol ---------------------------------------------------------------------

@pytest.fixture
def node_with_proxy(backend):
    """A node with every proxy configured, its backend the fake; ``history`` unproxied."""
    instance = create_app(proxy_config(
        node_id="unit", events_per_second=1, events_burst=10,
        namespaces={"free": NamespaceConfig(proxy_subscribe_url="", proxy_publish_url="")}))
    instance.engine.protocol.proxy.post = backend
    instance.start()
    yield instance
    instance.stop()


def client_of(node, auth=None, headers=None) -> tuple[SessionClient, object]:
    client = SessionClient(node.engine, JSON, RequestContext(
        "10.0.0.9", None, {"host": "x", "cookie": "s=alice", **(headers or {})},
        {"transport": "websocket"}))
    return client, client.connect(auth)


def test_the_connect_backend_decides_who_the_client_is(node_with_proxy, backend):
    backend.answer("connect", 200, {"user": "alice", "info": {"n": 1}})
    client, answer = client_of(node_with_proxy, {"user": "mallory"})
    assert answer.type is PacketType.CONNECT and client.session.user == "alice"
    assert backend.bodies("connect")[0]["headers"] == {"cookie": "s=alice"}
    assert backend.bodies("connect")[0]["transport"] == "websocket"
    backend.answer("connect", 200, {"error": {"code": "unauthorized", "message": "log in"}})
    _, refused = client_of(node_with_proxy)
    assert refused.type is PacketType.CONNECT_ERROR
    assert refused.data == {"message": "unauthorized", "data": {"reason": "log in"}}
    backend.answers["connect"] = (500, b"oops")
    _, failed = client_of(node_with_proxy)
    assert failed.data["message"] == "unavailable"


def test_a_session_keeps_the_listed_headers_for_its_subscribe_and_publish_calls(
        node_with_proxy, backend):
    backend.answer("connect", 200, {"user": "alice"})
    client, _ = client_of(node_with_proxy, headers={"user-agent": "ua"})
    assert client.session.request.headers == {"cookie": "s=alice"}
    assert client.emit("subscribe", {"channel": "room"})["ok"]
    assert client.emit("publish", {"channel": "room", "data": 1})["ok"]
    for kind in ("subscribe", "publish"):
        assert backend.bodies(kind)[0]["headers"] == {"cookie": "s=alice"}
        assert backend.bodies(kind)[0]["peer"] == "10.0.0.9"


def test_refusals_and_failures_are_acks_and_nothing_is_subscribed_or_published(
        node_with_proxy, backend):
    backend.answer("connect", 200, {"user": "alice"})
    client, _ = client_of(node_with_proxy)
    backend.answer("subscribe", 200, {"error": {"code": "forbidden", "message": "members"}})
    assert client.emit("subscribe", {"channel": "room"}) == {
        "ok": False, "error": {"code": "forbidden", "message": "members"}}
    assert "room" not in client.session.channels
    backend.answers["publish"] = BackendFailure("no answer within 1.5 s")
    ack = client.emit("publish", {"channel": "room", "data": 1})
    assert ack["ok"] is False and ack["error"]["code"] == "unavailable"
    assert node_with_proxy.node.history("room", None).publications == []


def test_history_and_presence_of_a_proxied_channel_need_an_allowed_subscription(
        node_with_proxy, backend):
    backend.answer("connect", 200, {"user": "alice"})
    client, _ = client_of(node_with_proxy)
    assert client.emit("history", {"channel": "room"})["error"]["code"] == "forbidden"
    assert client.emit("presence", {"channel": "room"})["error"]["code"] == "forbidden"
    assert client.emit("history", {"channel": "free:room"})["ok"]  # no backend there
    assert client.emit("subscribe", {"channel": "room"})["ok"]
    assert client.emit("history", {"channel": "room"})["ok"]
    assert client.emit("presence", {"channel": "room"})["ok"]
    # already subscribed: a second subscribe (to recover, say) does not ask again
    assert client.emit("subscribe", {"channel": "room"})["ok"]
    assert len(backend.bodies("subscribe")) == 1


def test_rewritten_data_is_published_and_acks_keep_the_event_order(node_with_proxy, backend):
    backend.answer("connect", 200, {"user": "alice"})
    client, _ = client_of(node_with_proxy)
    calls = iter([{"data": "first!"}, {"error": {"code": "too_large"}}, {"allow": True}])
    rewrite = backend.__call__

    def answer(url, body, timeout):
        if url.endswith("/publish"):
            backend.answer("publish", 200, next(calls))
        return rewrite(url, body, timeout)

    node_with_proxy.engine.protocol.proxy.post = answer
    ids = [client.emit_no_wait("publish", {"channel": "room", "data": n}) for n in range(3)]
    acks = [client.wait_ack(ack_id) for ack_id in ids]
    assert [a["ok"] for a in acks] == [True, False, True]
    assert acks[1]["error"]["code"] == "too_large" and acks[0]["offset"] < acks[2]["offset"]
    history = node_with_proxy.node.history("room", None).publications
    assert [p.data for p in history] == ["first!", 2]


def test_oversize_data_is_refused_before_the_backend_and_after_a_rewrite(node_with_proxy,
                                                                        backend):
    backend.answer("connect", 200, {"user": "alice"})
    client, _ = client_of(node_with_proxy)
    limit = node_with_proxy.config.max_message_size
    ack = client.emit("publish", {"channel": "room", "data": "x" * limit})
    assert ack["error"]["code"] == "too_large" and backend.bodies("publish") == []
    backend.answer("publish", 200, {"data": "y" * limit})
    ack = client.emit("publish", {"channel": "room", "data": "small"})
    assert ack["error"]["code"] == "too_large" and len(backend.bodies("publish")) == 1
    assert node_with_proxy.node.history("room", None).publications == []


def test_the_event_budget_applies_before_the_backend_is_called(node_with_proxy, backend):
    backend.answer("connect", 200, {"user": "alice"})
    client, _ = client_of(node_with_proxy)
    ids = [client.emit_no_wait("subscribe", {"channel": f"room{n}"}) for n in range(13)]
    acks = [client.wait_ack(ack_id) for ack_id in ids]
    assert [a["ok"] for a in acks] == [True] * 10 + [False] * 3
    assert {a["error"]["code"] for a in acks[10:]} == {"rate_limited"}
    assert len(backend.bodies("subscribe")) == 10  # refused events cost the backend nothing


def test_with_a_jwt_key_too_a_token_is_verified_locally_and_the_rest_go_to_the_backend(
        backend):
    import jwt

    secret = "s" * 32
    instance = create_app(proxy_config(node_id="unit", jwt_secret=secret))
    instance.engine.protocol.proxy.post = backend
    instance.start()
    try:
        backend.answer("connect", 200, {"user": "cookie-user"})
        signed = jwt.encode({"sub": "token-user", "exp": int(time.time()) + 600}, secret)
        with_token, _ = client_of(instance, {"token": signed})
        without, _ = client_of(instance)
        assert (with_token.session.user, without.session.user) == ("token-user", "cookie-user")
        assert len(backend.bodies("connect")) == 1
        assert with_token.emit("refresh", {"token": signed})["ok"]
        assert without.emit("refresh", {"token": signed})["ok"] is False  # another user
    finally:
        instance.stop()


def proxy_metrics(node) -> dict[tuple[str, ...], float]:
    """The node's realtime_proxy_* samples: (name, call[, outcome]) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(node.node.metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name in ("realtime_proxy_calls_total", "realtime_proxy_call_seconds_count"):
                samples[(sample.name, *sample.labels.values())] = sample.value
    return samples


def test_every_proxy_call_is_counted_by_outcome_and_timed(node_with_proxy, backend):
    assert proxy_metrics(node_with_proxy)[
        ("realtime_proxy_calls_total", "connect", "answered")] == 0  # there before any call
    backend.answer("connect", 200, {"user": "alice"})
    client, _ = client_of(node_with_proxy)
    backend.answer("subscribe", 200, {"error": {"code": "forbidden", "message": "members"}})
    client.emit("subscribe", {"channel": "room"})
    backend.answer("subscribe", 200, {"allow": False})
    client.emit("subscribe", {"channel": "room"})
    backend.answers["publish"] = BackendFailure("no answer within 1.5 s")
    client.emit("publish", {"channel": "room", "data": 1})
    backend.answer("connect", 200, {"user": ""})  # not an identity: unavailable
    client_of(node_with_proxy)
    samples = proxy_metrics(node_with_proxy)
    calls = {key[1:]: value for key, value in samples.items()
             if key[0] == "realtime_proxy_calls_total" and value}
    assert calls == {("connect", "answered"): 1, ("connect", "unavailable"): 1,
                     ("subscribe", "refused"): 2, ("publish", "unavailable"): 1}
    timed = {key[1]: value for key, value in samples.items()
             if key[0] == "realtime_proxy_call_seconds_count"}
    assert timed == {"connect": 2, "subscribe": 2, "publish": 1}

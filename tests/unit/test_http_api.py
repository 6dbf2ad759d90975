"""The HTTP API through Flask's test client."""

import pytest

from realtime.app import create_app
from realtime.codecs import PacketType
from realtime.config import Config
from tests.helpers import wait_until


@pytest.fixture
def http(realtime):
    return realtime.app.test_client()


def test_publish_and_history(http):
    first = http.post("/api/publish", json={"channel": "news", "data": {"title": "a"}})
    assert first.status_code == 200 and first.json["offset"] == 1
    second = http.post("/api/publish", json={"channel": "news", "data": "b"}).json
    assert second == {"offset": 2, "epoch": first.json["epoch"]}
    history = http.get("/api/history/news?limit=1").json
    assert history == {"epoch": second["epoch"], "offset": 2, "publications": [
        {"channel": "news", "offset": 2, "data": "b", "user": None}]}
    assert len(http.get("/api/history/news").json["publications"]) == 2


def test_broadcast_publishes_on_each_channel(http):
    http.post("/api/publish", json={"channel": "b", "data": 0})
    response = http.post("/api/broadcast", json={"channels": ["a", "b"], "data": 1})
    assert response.status_code == 200
    assert [(r["channel"], r["offset"]) for r in response.json["results"]] == [("a", 1), ("b", 2)]


def test_publish_reaches_socketio_subscribers(http, connect):
    alice = connect("alice")
    alice.emit("subscribe", {"channel": "user:alice"})
    http.post("/api/publish", json={"channel": "user:alice", "data": {"n": 1}})
    assert alice.wait_events("message", 1) == [
        {"channel": "user:alice", "offset": 1, "data": {"n": 1}, "user": None}]


def test_presence_and_disconnect(http, connect):
    alice, alice2, bob = connect("alice"), connect("alice"), connect("bob")
    for client in (alice, alice2, bob):
        client.emit("subscribe", {"channel": "room"})
    assert http.get("/api/presence/room").json == {"members": [
        {"user": "alice", "connections": 2}, {"user": "bob", "connections": 1}]}
    assert http.post("/api/disconnect", json={"user": "alice"}).json == {"disconnected": 2}
    assert alice.session.closed and alice2.session.closed and not bob.session.closed
    # told with a Socket.IO DISCONNECT: the client must not reconnect by itself
    assert alice.socketio_packets()[-1].type is PacketType.DISCONNECT
    wait_until(lambda: http.get("/api/presence/room").json == {"members": [
        {"user": "bob", "connections": 1}]})


def test_info_and_probes(http, connect):
    connect("alice").emit("subscribe", {"channel": "x"})
    (node,) = http.get("/api/info").json["nodes"]
    assert node["node_id"] == "unit" and node["connections"] == 1
    assert node["subscriptions"] == 1 and node["uptime_s"] >= 0
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200


def test_readyz_is_503_when_the_node_is_stopped(realtime, http):
    realtime.node.stop()
    assert http.get("/readyz").status_code == 503
    assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize("method,path,body,status,code", [
    ("post", "/api/publish", {"channel": "bad name", "data": 1}, 400, "bad_request"),
    ("post", "/api/publish", {"channel": "c"}, 400, "bad_request"),
    ("post", "/api/publish", ["not", "an", "object"], 400, "bad_request"),
    ("post", "/api/publish", {"channel": "c", "data": "x" * 70000}, 413, "too_large"),
    ("post", "/api/broadcast", {"channels": "c", "data": 1}, 400, "bad_request"),
    ("post", "/api/broadcast", {"channels": [], "data": 1}, 400, "bad_request"),
    ("post", "/api/broadcast", {"channels": ["ok", "not ok"], "data": 1}, 400, "bad_request"),
    ("post", "/api/disconnect", {"user": 7}, 400, "bad_request"),
    ("get", "/api/history/c?limit=x", None, 400, "bad_request"),
    ("get", "/api/history/c?limit=-2", None, 400, "bad_request"),
    ("get", "/api/history/" + "x" * 201, None, 400, "bad_request"),
    ("get", "/api/nothing-here", None, 404, "not_found"),
])
def test_bad_requests_get_json_errors(http, method, path, body, status, code):
    response = getattr(http, method)(path, json=body)
    assert response.status_code == status
    assert response.json["error"]["code"] == code and response.json["error"]["message"]


def test_non_json_bodies_and_huge_bodies(http):
    response = http.post("/api/publish", data="{nope", content_type="application/json")
    assert response.status_code == 400 and response.json["error"]["code"] == "bad_request"
    response = http.post("/api/publish", data="x" * 300_000, content_type="application/json")
    assert response.status_code == 413 and response.json["error"]["code"] == "too_large"


KEY, OTHER_KEY = "k-" + "a" * 30, "k-" + "b" * 30


@pytest.fixture
def make_http():
    """``make_http(**config)``: a test client of a node of its own, built with ``config``."""
    started = []

    def make(**settings):
        instance = create_app(Config(node_id="unit", **settings))
        instance.start()
        started.append(instance)
        return instance.app.test_client()

    yield make
    for instance in started:
        instance.stop()


def call(http, path="/api/info", *, peer="127.0.0.1", **headers):
    """GET ``path`` from ``peer`` with ``headers`` (underscores in names become dashes)."""
    return http.get(path, environ_base={"REMOTE_ADDR": peer},
                    headers={name.replace("_", "-"): value for name, value in headers.items()})


def assert_error(response, status, code):
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    assert response.json["error"]["code"] == code and response.json["error"]["message"]


@pytest.fixture
def keyed(make_http):
    return make_http(api_keys=[KEY, OTHER_KEY])


def test_with_keys_a_request_without_a_key_gets_401_with_a_challenge(keyed):
    response = call(keyed)
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "apikey"
    assert "apikey" in response.json["error"]["message"]


@pytest.mark.parametrize("authorization", [
    "apikey wrong", "apikey " + KEY[:-1], "apikey " + KEY + "x", "apikey", "apikey  ",
    "Bearer " + KEY, KEY, "apikey" + KEY, "apikey " + KEY.upper(),
])
def test_with_keys_a_wrong_or_malformed_key_gets_401(keyed, authorization):
    response = call(keyed, Authorization=authorization)
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "apikey"


@pytest.mark.parametrize("key", [KEY, OTHER_KEY])
def test_with_keys_any_configured_key_is_accepted_from_anywhere(keyed, key):
    assert call(keyed, Authorization=f"apikey {key}").status_code == 200
    assert call(keyed, peer="203.0.113.9", Authorization=f"ApiKey  {key} ").status_code == 200
    response = keyed.post("/api/publish", json={"channel": "c", "data": 1},
                          environ_base={"REMOTE_ADDR": "2001:db8::9"},
                          headers={"Authorization": f"apikey {key}"})
    assert response.status_code == 200 and response.json["offset"] >= 1


def test_with_keys_loopback_without_a_key_is_refused_too(keyed):
    assert_error(call(keyed, peer="127.0.0.1"), 401, "unauthorized")
    assert_error(call(keyed, peer="::1"), 401, "unauthorized")


def test_with_keys_every_api_path_is_guarded_even_unknown_ones(keyed):
    assert_error(call(keyed, "/api/nothing-here"), 401, "unauthorized")
    assert_error(keyed.get("/api/publish"), 401, "unauthorized")  # a method no route takes
    assert_error(keyed.post("/api/publish", data="{nope", content_type="application/json"),
                 401, "unauthorized")
    # once in, the usual answers
    assert_error(call(keyed, "/api/nothing-here", Authorization=f"apikey {KEY}"), 404,
                 "not_found")


def test_keys_do_not_guard_what_is_not_the_api(keyed):
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").status_code == 200
    assert "WWW-Authenticate" not in keyed.get("/no-such-page").headers


def test_api_keys_are_compared_in_constant_time(keyed, monkeypatch):
    import hmac

    from realtime import http_api

    compared = []
    real_compare = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(http_api.hmac, "compare_digest", spy)
    assert call(keyed, Authorization=f"apikey {KEY}").status_code == 200
    # every key is compared (not only up to the first match), always as 32-byte digests
    assert len(compared) == 2 and all(len(a) == len(b) == 32 for a, b in compared)


def test_without_keys_loopback_clients_are_answered(http):
    assert call(http, peer="127.0.0.1").status_code == 200
    assert call(http, peer="127.5.6.7").status_code == 200
    assert call(http, peer="::1").status_code == 200
    assert call(http, peer="::ffff:127.0.0.1").status_code == 200


@pytest.mark.parametrize("peer", ["10.1.2.3", "203.0.113.9", "2001:db8::1"])
def test_without_keys_other_clients_get_403(http, peer):
    response = http.post("/api/publish", json={"channel": "c", "data": 1},
                         environ_base={"REMOTE_ADDR": peer})
    assert_error(response, 403, "forbidden")
    assert "WWW-Authenticate" not in response.headers
    assert_error(call(http, "/api/nothing-here", peer=peer), 403, "forbidden")


def test_without_keys_a_key_does_not_open_the_api_to_other_hosts(http):
    assert_error(call(http, peer="203.0.113.9", Authorization=f"apikey {KEY}"), 403, "forbidden")


def test_without_keys_the_forwarded_for_of_an_untrusted_peer_is_ignored(http):
    assert_error(call(http, peer="203.0.113.9", X_Forwarded_For="127.0.0.1"), 403, "forbidden")


def test_without_keys_the_forwarded_for_of_a_trusted_proxy_names_the_client(http):
    # nginx on the same machine: the peer is loopback, the client is who nginx says it is.
    assert_error(call(http, peer="127.0.0.1", X_Forwarded_For="203.0.113.9"), 403, "forbidden")
    assert call(http, peer="127.0.0.1", X_Forwarded_For="127.0.0.1").status_code == 200
    # a client's own forgery to the left of what nginx appended changes nothing
    assert_error(call(http, peer="127.0.0.1", X_Forwarded_For="127.0.0.1, 203.0.113.9"), 403,
                 "forbidden")
    # a garbled chain is no loopback client
    assert_error(call(http, peer="127.0.0.1", X_Forwarded_For="127.0.0.1, junk"), 403,
                 "forbidden")


def test_trusted_proxies_come_from_the_configuration(make_http):
    http = make_http(trusted_proxies="10.0.0.0/24")
    # a proxy on 10.0.0.5 forwarding a local client: believed
    assert call(http, peer="10.0.0.5", X_Forwarded_For="127.0.0.1").status_code == 200
    assert_error(call(http, peer="10.0.0.5", X_Forwarded_For="10.9.9.9"), 403, "forbidden")
    # loopback is no longer a trusted proxy: its header is ignored, the peer itself counts
    assert call(http, peer="127.0.0.1", X_Forwarded_For="203.0.113.9").status_code == 200


def test_a_publish_retried_with_its_idempotency_key_answers_the_first_position(http, connect):
    watcher = connect("watcher")
    watcher.emit("subscribe", {"channel": "orders"})
    body = {"channel": "orders", "data": {"id": 7}, "idempotency_key": "order-7"}
    first = http.post("/api/publish", json=body)
    retry = http.post("/api/publish", json=body)
    assert first.status_code == retry.status_code == 200 and retry.json == first.json
    other = http.post("/api/publish", json={**body, "idempotency_key": "order-8"}).json
    assert other["offset"] == first.json["offset"] + 1
    assert [m["offset"] for m in watcher.wait_events("message", 2)] == [1, 2]
    assert len(http.get("/api/history/orders").json["publications"]) == 2


def test_a_broadcast_retried_with_its_key_publishes_only_where_it_had_not(http):
    http.post("/api/publish", json={"channel": "b", "data": "x", "idempotency_key": "k"})
    response = http.post("/api/broadcast", json={"channels": ["a", "b", "c"], "data": 1,
                                                 "idempotency_key": "k"})
    assert response.status_code == 200
    # b had the key already (from the publish): it answers that publication's position
    assert [(r["channel"], r["offset"]) for r in response.json["results"]] == [
        ("a", 1), ("b", 1), ("c", 1)]
    assert http.post("/api/broadcast", json={"channels": ["a", "b", "c"], "data": 1,
                                             "idempotency_key": "k"}).json == response.json
    assert [p["data"] for p in http.get("/api/history/b").json["publications"]] == ["x"]


@pytest.mark.parametrize("key", ["", "k" * 65, 7, ["k"], {"k": 1}, True, "\ud800"])
def test_a_bad_idempotency_key_is_a_400_and_publishes_nothing(http, key):
    for path, body in (("/api/publish", {"channel": "keys", "data": 1}),
                       ("/api/broadcast", {"channels": ["keys"], "data": 1})):
        response = http.post(path, json={**body, "idempotency_key": key})
        assert response.status_code == 400, (path, key)
        assert response.json["error"]["code"] == "bad_request"
        assert "idempotency_key" in response.json["error"]["message"]
    assert http.get("/api/history/keys").json["publications"] == []

"""The HTTP API's hot routes served before Flask (FastRoutes) and POST /api/batch.

Flask's test client on ``realtime.app`` reaches the Flask routes; on ``realtime.wsgi`` (the
node's WSGI entry) the fast ones: the same request must get the same answer from both.
"""

import json

import pytest
from werkzeug.test import Client

from realtime.app import create_app
from realtime.config import Config
from realtime.http_api import BATCH_BODY_LIMIT, MAX_BATCH_COMMANDS

KEY = "unit-key"


def local(wsgi):
    """A test client of ``wsgi`` whose requests come from loopback (as Flask's test client's)."""
    def app(environ, start_response):
        environ["REMOTE_ADDR"] = environ.get("REMOTE_ADDR") or "127.0.0.1"
        return wsgi(environ, start_response)

    return Client(app)


@pytest.fixture
def fast(realtime):
    return local(realtime.wsgi)


@pytest.fixture
def flask(realtime):
    return local(lambda environ, start_response: realtime.app(environ, start_response))


@pytest.fixture
def keyed():
    instance = create_app(Config(node_id="unit", api_keys=(KEY,)))
    instance.start()
    yield instance
    instance.stop()


def answer(response):
    """What a client sees of an answer: status, body, and the headers that matter."""
    return (response.status, response.get_data(), response.headers.get("Content-Type"),
            response.headers.get("WWW-Authenticate"))


def test_a_publish_on_the_fast_route_never_reaches_flask(realtime, fast, monkeypatch):
    def refuse(*args):
        raise AssertionError("Flask dispatched a hot route")

    monkeypatch.setattr(realtime, "app", refuse)
    response = fast.post("/api/publish", json={"channel": "news", "data": 1})
    assert response.status_code == 200 and response.json["offset"] == 1


BAD_BODIES = {
    "not json": ("/api/publish", b"{nope", "application/json"),
    "not an object": ("/api/publish", b"[1, 2]", "application/json"),
    "not utf-8": ("/api/publish", b'{"channel": "\xff"}', "application/json"),
    "form content type": ("/api/publish", b'{"channel": "a", "data": 1}',
                          "application/x-www-form-urlencoded"),
    "no channel": ("/api/publish", b'{"data": 1}', "application/json"),
    "bad channel": ("/api/publish", b'{"channel": "a b", "data": 1}', "application/json"),
    "no data": ("/api/publish", b'{"channel": "a"}', "application/json"),
    "bad idempotency key": ("/api/publish", b'{"channel": "a", "data": 1, '
                            b'"idempotency_key": ""}', "application/json"),
    "data too large": ("/api/publish", json.dumps(
        {"channel": "a", "data": "x" * (70 * 1024)}).encode(), "application/json"),
    "body too large": ("/api/publish", json.dumps(
        {"channel": "a", "data": "x" * (200 * 1024)}).encode(), "application/json"),
    "deep nesting": ("/api/publish", b'{"channel": "a", "data": ' + b"[" * 200 + b"]" * 200
                     + b"}", "application/json"),
    "broadcast without channels": ("/api/broadcast", b'{"channels": [], "data": 1}',
                                   "application/json"),
    "broadcast bad channel": ("/api/broadcast", b'{"channels": ["a", "!"], "data": 1}',
                              "application/json"),
    "batch without commands": ("/api/batch", b'{"commands": []}', "application/json"),
    "batch too many commands": ("/api/batch", json.dumps({"commands": [
        {"method": "publish", "params": {"channel": "a", "data": 1}}]
        * (MAX_BATCH_COMMANDS + 1)}).encode(), "application/json"),
    "batch body too large": ("/api/batch", json.dumps({"commands": [
        {"method": "publish", "params": {"channel": "a", "data": "x" * BATCH_BODY_LIMIT}}]}
        ).encode(), "application/json"),
}


@pytest.mark.parametrize("path, body, content_type", BAD_BODIES.values(), ids=BAD_BODIES)
def test_a_bad_request_gets_the_flask_routes_answer_byte_for_byte(fast, flask, path, body,
                                                                  content_type):
    from_fast = fast.post(path, data=body, content_type=content_type)
    from_flask = flask.post(path, data=body, content_type=content_type)
    assert from_fast.status_code in (400, 413)
    assert answer(from_fast) == answer(from_flask)


def test_good_requests_get_the_flask_routes_answers(fast, flask):
    for client in (fast, flask):
        client.post("/api/publish", json={"channel": "warm", "data": 0})
    for path, body in [("/api/publish", {"channel": "a", "data": {"n": "é"}}),
                       ("/api/broadcast", {"channels": ["b", "c"], "data": 1}),
                       ("/api/batch", {"commands": [
                           {"method": "publish", "params": {"channel": "d", "data": 2}}]})]:
        from_fast, from_flask = fast.post(path, json=body), flask.post(path, json=body)
        assert from_fast.status_code == 200
        # the second answer is one offset further on: compare their shapes and encodings
        assert from_fast.headers["Content-Type"] == from_flask.headers["Content-Type"]
        assert from_fast.get_data().endswith(b"}\n") and from_flask.get_data().endswith(b"}\n")
        assert from_fast.json.keys() == from_flask.json.keys()


@pytest.mark.parametrize("path", ["/api/publish", "/api/broadcast", "/api/batch"])
@pytest.mark.parametrize("authorization", [None, "apikey wrong", "Bearer " + KEY])
def test_with_keys_the_fast_routes_answer_401_like_flask(keyed, path, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    body = {"channel": "a", "data": 1}
    from_fast = local(keyed.wsgi).post(path, json=body, headers=headers)
    from_flask = local(keyed.app).post(path, json=body, headers=headers)
    assert from_fast.status_code == 401 and from_fast.headers["WWW-Authenticate"] == "apikey"
    assert answer(from_fast) == answer(from_flask)


def test_with_keys_the_key_opens_the_fast_routes(keyed):
    response = local(keyed.wsgi).post("/api/publish", json={"channel": "a", "data": 1},
                                       headers={"Authorization": "apikey " + KEY})
    assert response.status_code == 200


@pytest.mark.parametrize("path", ["/api/publish", "/api/batch"])
def test_without_keys_a_remote_client_gets_403_like_flask(realtime, path):
    environ = {"REMOTE_ADDR": "192.0.2.7"}
    body = {"channel": "a", "data": 1}
    from_fast = Client(realtime.wsgi).post(path, json=body, environ_base=environ)
    from_flask = Client(realtime.app).post(path, json=body, environ_base=environ)
    assert from_fast.status_code == 403
    assert answer(from_fast) == answer(from_flask)


def test_errors_on_the_fast_routes_are_counted(realtime, fast):
    fast.post("/api/publish", json={"channel": "a b", "data": 1})
    fast.post("/api/batch", json={"commands": [{"method": "nope", "params": {}}]})
    assert realtime.node.counters.errors["bad_request"] == 2


def test_other_methods_and_paths_still_go_to_flask(fast, flask):
    for method, path in [("GET", "/api/publish"), ("PUT", "/api/batch"),
                         ("POST", "/api/publish/"), ("POST", "/api/history/a")]:
        from_fast = fast.open(path, method=method, json={})
        assert from_fast.status_code in (404, 405)
        assert answer(from_fast) == answer(flask.open(path, method=method, json={}))


# -- POST /api/batch -------------------------------------------------------------------------

@pytest.fixture(params=["fast", "flask"])
def api(request, fast, flask):
    """Both ways to /api/batch: the answers must not depend on it."""
    return fast if request.param == "fast" else flask


def batch(api, *commands):
    response = api.post("/api/batch", json={"commands": list(commands)})
    assert response.status_code == 200, response.get_data()
    return response.json["replies"]


def publish(channel, data, **extra):
    return {"method": "publish", "params": {"channel": channel, "data": data, **extra}}


def test_batch_replies_in_order_and_publishes_in_order(api, realtime):
    replies = batch(api, *(publish("news", n) for n in range(5)))
    assert [reply["result"]["offset"] for reply in replies] == [1, 2, 3, 4, 5]
    history = realtime.node.history("news").publications
    assert [p.data for p in history] == [0, 1, 2, 3, 4]


def test_batch_a_bad_command_gets_its_error_and_the_others_run(api, realtime):
    replies = batch(api, publish("a", 1), publish("not a channel", 2), "nonsense",
                    {"method": "subscribe", "params": {}}, {"method": "publish"},
                    publish("a", "x" * (70 * 1024)), publish("a", 3))
    assert replies[0] == {"result": {"offset": 1, "epoch": replies[0]["result"]["epoch"]}}
    assert [reply.get("error", {}).get("code") for reply in replies] == [
        None, "bad_request", "bad_request", "bad_request", "bad_request", "too_large", None]
    assert replies[2]["error"]["message"] == "a command must be an object {method, params}"
    assert replies[6]["result"]["offset"] == 2


def test_batch_broadcast_and_disconnect_reply_as_their_routes(api, connect):
    alice = connect("alice")
    replies = batch(api, {"method": "broadcast", "params": {"channels": ["x", "y"], "data": 1}},
                    {"method": "disconnect", "params": {"user": "alice"}},
                    {"method": "broadcast", "params": {"channels": ["x", "a b"], "data": 1}},
                    {"method": "disconnect", "params": {"user": ""}})
    assert [(r["channel"], r["offset"]) for r in replies[0]["result"]["results"]] == [
        ("x", 1), ("y", 1)]
    assert replies[1] == {"result": {"disconnected": 1}} and alice.session.closed
    assert replies[2]["error"]["code"] == "bad_request"
    assert replies[3]["error"] == {"code": "bad_request",
                                   "message": "user must be a non-empty string"}


def test_batch_broadcast_too_large_on_one_channel_publishes_on_none(api, realtime):
    assert realtime.config.max_message_size < 70 * 1024
    replies = batch(api, {"method": "broadcast", "params": {
        "channels": ["p", "q"], "data": "x" * (70 * 1024)}})
    assert replies[0]["error"]["code"] == "too_large"
    assert realtime.node.history("p").position.offset == 0


def test_batch_idempotency_keys_give_the_first_position_back(api):
    replies = batch(api, publish("k", 1, idempotency_key="once"),
                    publish("k", 2, idempotency_key="once"))
    assert replies[0] == replies[1]


def test_batch_publishes_go_to_the_broker_together(api, realtime, monkeypatch):
    calls = []
    publish_many = realtime.node.broker.publish_many

    def counting(requests, **kwargs):
        calls.append(len(requests))
        return publish_many(requests, **kwargs)

    monkeypatch.setattr(realtime.node.broker, "publish_many", counting)
    batch(api, *(publish(f"c{n}", n) for n in range(100)),
          {"method": "broadcast", "params": {"channels": ["d1", "d2"], "data": 0}})
    assert calls == [102]


def test_batch_of_the_largest_size_is_accepted(api):
    replies = batch(api, *(publish("big", n) for n in range(MAX_BATCH_COMMANDS)))
    assert len(replies) == MAX_BATCH_COMMANDS and replies[-1]["result"]["offset"] == 1000


def test_batch_takes_bodies_beyond_the_single_routes_limit(api, realtime):
    single_limit = 2 * realtime.config.max_message_size + realtime.config.frame_overhead
    commands = [publish("wide", "x" * 1000) for _ in range(400)]
    assert single_limit < len(json.dumps({"commands": commands})) < BATCH_BODY_LIMIT
    replies = batch(api, *commands)
    assert replies[-1]["result"]["offset"] == 400

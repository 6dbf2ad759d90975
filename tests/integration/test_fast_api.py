"""The HTTP API's hot routes and POST /api/batch on a real node on Redis; the emitter's
publish_many against a real Redis."""

from __future__ import annotations

import http.client
import json
import uuid

import pytest
import requests

from realtime.broker.base import PublishRequest
from realtime.emitter import Emitter
from realtime.errors import BadRequest, TooLarge
from realtime.http_api import MAX_BATCH_COMMANDS
from realtime_dev.processes import NodeProcess

KEY = "itest-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def redis_node(tmp_path_factory, redis_server):
    """A node on the tests' Redis, without API keys (loopback callers only)."""
    node = NodeProcess(tmp_path_factory.mktemp("fast-api"), "fast",
                       "--broker", redis_server.url).wait_ready()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def keyed_node(tmp_path_factory, redis_server):
    node = NodeProcess(tmp_path_factory.mktemp("fast-api-keyed"), "fastkeyed",
                       "--broker", redis_server.url, "--api-key", KEY).wait_ready()
    yield node
    node.stop()


def batch(node, commands, **kwargs):
    response = requests.post(node.url + "/api/batch", json={"commands": commands}, timeout=10,
                             **kwargs)
    assert response.status_code == 200, response.text
    return response.json()["replies"]


def history(node, channel):
    response = requests.get(f"{node.url}/api/history/{channel}", timeout=10)
    return [publication["data"] for publication in response.json()["publications"]]


def test_batch_on_redis_replies_in_order_with_errors_in_their_slots(redis_node, channel):
    replies = batch(redis_node, [
        {"method": "publish", "params": {"channel": channel, "data": 1}},
        {"method": "publish", "params": {"channel": "bad channel", "data": 2}},
        {"method": "broadcast", "params": {"channels": [channel, channel + "b"], "data": 3}},
        {"method": "publish", "params": {"channel": channel, "data": 4,
                                         "idempotency_key": "k"}},
        {"method": "publish", "params": {"channel": channel, "data": 5,
                                         "idempotency_key": "k"}},
        {"method": "disconnect", "params": {"user": "nobody"}},
        {"method": "publish", "params": {"channel": channel, "data": 6}},
    ])
    assert [reply["result"]["offset"] if "result" in reply and "offset" in reply["result"]
            else None for reply in replies] == [1, None, None, 3, 3, None, 4]
    assert replies[1]["error"]["code"] == "bad_request"
    assert [r["offset"] for r in replies[2]["result"]["results"]] == [2, 1]
    assert replies[5] == {"result": {"disconnected": 0}}
    assert history(redis_node, channel) == [1, 3, 4, 6]


def test_a_batch_over_the_cap_is_refused_whole_with_413(redis_node, channel):
    commands = [{"method": "publish", "params": {"channel": channel, "data": n}}
                for n in range(MAX_BATCH_COMMANDS + 1)]
    response = requests.post(redis_node.url + "/api/batch", json={"commands": commands},
                             timeout=10)
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
    assert history(redis_node, channel) == []


def test_one_keep_alive_connection_carries_many_requests_good_and_bad(redis_node, channel):
    connection = http.client.HTTPConnection("127.0.0.1", redis_node.port, timeout=10)
    headers = {"Content-Type": "application/json"}
    try:
        connection.connect()
        sock = connection.sock
        for n in range(300):
            if n % 3 == 0:
                path, body = "/api/publish", json.dumps({"channel": channel, "data": n})
            elif n % 3 == 1:
                path, body = "/api/batch", json.dumps({"commands": [
                    {"method": "publish", "params": {"channel": channel, "data": n}}]})
            else:
                path, body = "/api/publish", "{not json"
            connection.request("POST", path, body, headers)
            response = connection.getresponse()
            answer = json.loads(response.read())
            assert response.status == (400 if n % 3 == 2 else 200), answer
            assert connection.sock is sock  # never reconnected: the node kept it open
    finally:
        connection.close()
    # every good request published (history keeps the last 100; the offset counts them all)
    assert requests.get(f"{redis_node.url}/api/history/{channel}",
                        timeout=10).json()["offset"] == 200


def test_fast_route_errors_match_the_flask_routes_on_a_real_node(redis_node):
    # /api/disconnect is still Flask's: the same bad bodies must get the same answers there.
    def post(path, data, content_type="application/json"):
        response = requests.post(redis_node.url + path, data=data, timeout=10,
                                 headers={"Content-Type": content_type})
        return response.status_code, response.headers["Content-Type"], response.content

    for data, content_type in [(b"{nope", "application/json"), (b"[]", "application/json"),
                               (b"{}", "text/plain"), (b"x" * (200 * 1024), "application/json")]:
        fast = post("/api/publish", data, content_type)
        assert fast[0] in (400, 413)
        assert fast == post("/api/disconnect", data, content_type)


@pytest.mark.parametrize("path", ["/api/publish", "/api/broadcast", "/api/batch"])
def test_with_keys_the_fast_routes_want_the_key(keyed_node, path):
    body = {"channel": "a", "channels": ["a"], "data": 1,
            "commands": [{"method": "publish", "params": {"channel": "a", "data": 1}}]}
    for authorization in (None, "apikey wrong"):
        headers = {"Authorization": authorization} if authorization else {}
        response = requests.post(keyed_node.url + path, json=body, headers=headers, timeout=10)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "apikey"
        assert response.json()["error"]["code"] == "unauthorized"
    response = requests.post(keyed_node.url + path, json=body, timeout=10,
                             headers={"Authorization": "apikey " + KEY})
    assert response.status_code == 200


def test_without_keys_a_forwarded_remote_client_gets_403_on_the_fast_routes(redis_node):
    # loopback is a trusted proxy by default: the client is the one it forwards for
    for path in ("/api/publish", "/api/batch"):
        response = requests.post(redis_node.url + path, json={"channel": "a", "data": 1},
                                 headers={"X-Forwarded-For": "192.0.2.9"}, timeout=10)
        assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"


def test_emitter_publish_many_on_redis_in_order_with_errors_in_their_slots(redis_node,
                                                                          redis_server, channel):
    with Emitter(redis_server.url) as emitter:
        results = emitter.publish_many([
            PublishRequest(channel, 1), PublishRequest("not a channel", 2),
            PublishRequest(channel, "x" * (70 * 1024)),
            PublishRequest(channel, 3, idempotency_key="once"),
            PublishRequest(channel, 4, idempotency_key="once"),
            PublishRequest(channel + "b", 5), PublishRequest(channel, 6),
        ])
        again = emitter.publish_many([PublishRequest(channel, 7, idempotency_key="once")])
    assert isinstance(results[1], BadRequest) and isinstance(results[2], TooLarge)
    offsets = [None if isinstance(result, Exception) else result.offset for result in results]
    assert offsets == [1, None, None, 2, 2, 1, 3]
    assert again[0] == results[3]
    # the node reads what the emitter wrote, in order
    assert history(redis_node, channel) == [1, 3, 6]

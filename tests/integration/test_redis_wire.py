"""The pipelined Redis connection of the node's hot paths, against a real redis-server."""

from __future__ import annotations

import gevent
import pytest
import redis
from gevent.server import StreamServer

from realtime import redis_wire
from realtime.redis_support import LuaScript
from realtime.redis_wire import CommandPipe, open_connection
from realtime.sockets import sendall
from realtime_dev.processes import free_port
from tests.contract.broker_contract import unique
from tests.helpers import wait_until


@pytest.fixture
def admin(redis_server):
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


@pytest.fixture
def make_pipe(redis_server):
    pipes = []

    def make(url=None, timeout=2.0):
        pipe = CommandPipe(url or redis_server.url, timeout=timeout)
        pipes.append(pipe)
        return pipe

    yield make
    for pipe in pipes:
        pipe.close()


def test_commands_of_many_greenlets_run_in_call_order(make_pipe, admin):
    pipe, key = make_pipe(), unique("counter")
    calls = [gevent.spawn(pipe.call, "INCR", key) for _ in range(300)]
    gevent.joinall(calls, timeout=10, raise_error=True)
    assert [call.value for call in calls] == list(range(1, 301))
    assert admin.get(key) == b"300"


def test_commands_submitted_in_one_loop_turn_share_one_write(make_pipe, admin, monkeypatch):
    pipe, key = make_pipe(), unique("counter")
    pipe.call("PING")  # connected
    writes = []

    def counting_sendall(sock, data):
        writes.append(data)
        return sendall(sock, data)

    monkeypatch.setattr(redis_wire, "sendall", counting_sendall)
    calls = [gevent.spawn(pipe.call, "INCR", key) for _ in range(50)]
    gevent.joinall(calls, timeout=10, raise_error=True)
    assert len(writes) == 1 and admin.get(key) == b"50"


def test_an_error_reply_fails_only_its_own_command(make_pipe):
    pipe, key = make_pipe(), unique("string")
    assert pipe.call("SET", key, "text") == b"OK"
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        pipe.call("LPUSH", key, "x")
    assert pipe.call("GET", key) == b"text"


def test_a_script_redis_does_not_know_is_loaded_on_first_use(make_pipe, admin):
    pipe, key = make_pipe(), unique("scripted")
    script = LuaScript(f"-- {key}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])")
    admin.script_flush()
    assert pipe.run_script(script, [key], [5]) == 5
    assert admin.script_exists(script.sha) == [True]
    assert pipe.run_script(script, [key], [2]) == 7


def test_a_killed_connection_fails_waiting_commands_and_the_next_call_reconnects(
        make_pipe, admin):
    pipe, key = make_pipe(), unique("blocked")
    pipe.call("PING")
    waiter = gevent.spawn(pipe.call, "BLPOP", key, 5)  # parks until the kill
    gevent.sleep(0.05)
    assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
    with pytest.raises(redis.ConnectionError):
        waiter.get(timeout=5)
    assert pipe.call("PING") == b"PONG"


def test_a_redis_that_does_not_answer_times_out(make_pipe, admin):
    pipe = make_pipe(timeout=0.3)
    pipe.call("PING")
    admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    try:
        with pytest.raises(redis.TimeoutError):
            pipe.call("PING")
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
    assert pipe.call("PING") == b"PONG"


def test_an_unreachable_redis_is_a_connection_error(make_pipe):
    pipe = make_pipe(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    with pytest.raises(redis.ConnectionError):
        pipe.call("PING")


def test_the_url_selects_the_database_and_authenticates(redis_server, admin, make_pipe):
    user, key = unique("user"), unique("key")
    admin.execute_command("ACL", "SETUSER", user, "on", ">s3cret", "~*", "+@all")
    try:
        pipe = make_pipe(f"redis://{user}:s3cret@127.0.0.1:{redis_server.port}/3")
        pipe.call("SET", key, "in db 3")
        assert redis.Redis(port=redis_server.port, db=3).get(key) == b"in db 3"
        assert admin.get(key) is None
        with pytest.raises(redis.ConnectionError, match="refused the handshake"):
            open_connection(f"redis://{user}:wrong@127.0.0.1:{redis_server.port}/0", 1.0)
    finally:
        admin.execute_command("ACL", "DELUSER", user)


def test_after_a_failed_connect_calls_fail_at_once_then_retry(make_pipe):
    port = free_port()
    pipe = make_pipe(f"redis://127.0.0.1:{port}/0", timeout=1.0)
    with pytest.raises(redis.ConnectionError):
        pipe.call("PING")

    accepted = []

    def answer_pong(sock, _address):
        accepted.append(sock)
        while sock.recv(1024):
            sock.sendall(b"+PONG\r\n")

    server = StreamServer(("127.0.0.1", port), answer_pong)
    server.start()
    try:
        with pytest.raises(redis.ConnectionError):
            pipe.call("PING")  # within RECONNECT_INTERVAL of the failure: no new attempt
        assert accepted == []

        def pong():
            try:
                return pipe.call("PING") == b"PONG"
            except redis.ConnectionError:
                return False

        wait_until(pong, timeout=5, interval=0.05, message="the pipe to reconnect")
        assert len(accepted) == 1
    finally:
        server.stop()

"""The nginx configuration rendered from nginx/realtime.conf.template."""

from __future__ import annotations

import json
import re
import resource
import subprocess
from pathlib import Path

import pytest

from realtime.config import Config
from realtime_dev.nginx import (
    NGINX_TEMPLATE,
    PLACEHOLDER_RE,
    WORKER_RLIMIT_NOFILE,
    nginx_command,
    render_nginx_config,
    render_template,
)
from realtime_dev.processes import find_executable

NODES = {"n1": "127.0.0.1:5001", "n2": "127.0.0.1:5002", "n3": "127.0.0.1:5003"}


def block(config: str, header: str) -> str:
    """The body of the first ``header { ... }`` block (blocks in question are not nested)."""
    match = re.search(re.escape(header) + r"\s*\{(.*?)\}", config, re.S)
    assert match, f"no block {header!r}"
    return match.group(1)


@pytest.fixture
def config(tmp_path: Path) -> str:
    return render_nginx_config(NODES, "127.0.0.1:8080", tmp_path)


def test_every_placeholder_of_the_template_is_replaced(config, tmp_path):
    assert PLACEHOLDER_RE.findall(NGINX_TEMPLATE.read_text())
    assert "{{" not in config and "}}" not in config
    assert f'pid "{tmp_path}/nginx.pid";' in config
    assert f'error_log "{tmp_path}/nginx-error.log"' in config
    for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert f'{temp}_temp_path "{tmp_path}/{temp}_temp";' in config
    assert "listen 127.0.0.1:8080;" in config
    assert "proxy_read_timeout 75s;" in config
    assert "daemon" not in re.sub(r"#.*", "", config)


def test_one_upstream_per_node_and_one_for_new_sessions(config):
    everyone = block(config, "upstream realtime_all")
    assert "least_conn;" in everyone
    assert "ip_hash" not in everyone
    assert [server.split()[0] for server in directives(everyone, "server")] \
        == [*NODES.values(), *NODES.values()]
    for node_id, address in NODES.items():
        assert directives(block(config, f"upstream realtime_node_{node_id}"), "server") \
            == [address]


def test_failures_take_a_node_out_of_rotation_but_never_every_node(config):
    everyone = block(config, "upstream realtime_all")
    servers = directives(everyone, "server")
    # a few failures in a short time take a node out for a short time...
    assert servers[:3] == [f"{address} max_fails=3 fail_timeout=5s" for address in NODES.values()]
    # ...and when every node is out, the same nodes as backups that are never taken out
    assert servers[3:] == [f"{address} backup max_fails=0" for address in NODES.values()]


def test_a_request_goes_to_another_node_only_after_an_error_a_timeout_or_a_refusal(config):
    # (never non_idempotent: a POST that reached a node is not sent to a second one)
    assert directives(location(config, "/"), "proxy_next_upstream") == ["error timeout"]
    # a handshake refused by a node that drains goes on to another
    assert directives(location(config, "/socket.io/"), "proxy_next_upstream") == [
        "error timeout http_503"]


def test_connections_to_the_nodes_are_kept_alive_and_let_go_before_the_nodes_do(config):
    idle_timeout = Config().idle_timeout
    upstreams = ["realtime_all", *(f"realtime_node_{node_id}" for node_id in NODES)]
    for name in upstreams:
        upstream = block(config, f"upstream {name}")
        assert len(directives(upstream, "keepalive")) == 1
        (timeout,) = directives(upstream, "keepalive_timeout")
        assert int(timeout.removesuffix("s")) < idle_timeout
    # No "Connection: close" to the nodes: a node closes such a connection after its answer
    # without saying so, and nginx would put it back in the pool all the same.
    upgrade_map = block(config, "map $http_upgrade $connection_upgrade")
    assert directives(upgrade_map, "default") == ["upgrade"]
    assert directives(upgrade_map, "''") == ["''"]
    assert "close" not in re.sub(r"#.*", "", upgrade_map)
    for path in ("/socket.io/", "/"):
        assert directives(location(config, path), "proxy_http_version") == ["1.1"]
    assert directives(location(config, "/"), "proxy_set_header")[0] == 'Connection ""'


def test_the_sid_argument_picks_the_upstream(config):
    sid_map = block(config, "map $arg_sid $realtime_node")
    assert r'"~^(?<node>[A-Za-z0-9_-]+)\." $node;' in sid_map
    node_map = block(config, "map $realtime_node $realtime_upstream")
    lines = [line.strip() for line in node_map.strip().splitlines()]
    assert lines == ["default realtime_all;", "n1 realtime_node_n1;", "n2 realtime_node_n2;",
                     "n3 realtime_node_n3;"]
    socketio = config[config.index("location /socket.io/"):]
    assert "proxy_pass http://$realtime_upstream;" in socketio
    assert "proxy_set_header Connection $connection_upgrade;" in socketio
    assert "proxy_buffering off;" in socketio


def test_node_ids_that_are_map_keywords_are_escaped(tmp_path):
    config = render_nginx_config({"default": "127.0.0.1:5001"}, "8080", tmp_path)
    assert r"\default realtime_node_default;" in config


@pytest.mark.parametrize("nodes", [{}, {"bad.id": "127.0.0.1:1"},
                                   {"n1": "127.0.0.1:1", "N1": "127.0.0.1:2"}])
def test_bad_node_sets_are_refused(nodes, tmp_path):
    with pytest.raises(ValueError):
        render_nginx_config(nodes, "8080", tmp_path)


@pytest.mark.parametrize("prefix", ["relative/dir", '/tmp/a"b', "/tmp/a;b"])
def test_unsafe_prefixes_are_refused(prefix):
    with pytest.raises(ValueError, match="prefix"):
        render_nginx_config(NODES, "8080", prefix)


def test_rendering_fails_on_unknown_missing_or_leftover_placeholders():
    assert render_template("a {{x}} b", {"x": "1"}) == "a 1 b"
    with pytest.raises(ValueError, match="no value for y"):
        render_template("{{x}} {{y}}", {"x": "1"})
    with pytest.raises(ValueError, match="no placeholder z"):
        render_template("{{x}}", {"x": "1", "z": "2"})
    with pytest.raises(ValueError, match="left after rendering"):
        render_template("{{x}}", {"x": "{{y}}"})


def test_multi_line_values_keep_the_indentation():
    assert render_template("  {{x}}\n", {"x": "a\n\nb"}) == "  a\n\n  b\n"


def test_the_file_limit_stays_within_the_hard_limit(config):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = int(re.search(r"worker_rlimit_nofile (\d+);", config).group(1))
    assert limit <= WORKER_RLIMIT_NOFILE
    assert hard == resource.RLIM_INFINITY or limit <= hard


def test_nginx_accepts_the_configuration(tmp_path):
    # A 32-character id is the longest there is: it must fit nginx's map hash buckets.
    nodes = {**NODES, "x" * 32: "127.0.0.1:5004", "default": "127.0.0.1:5005"}
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_config(nodes, "127.0.0.1:8080", tmp_path))
    result = subprocess.run([*nginx_command(find_executable("nginx"), tmp_path, conf), "-t"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def location(config: str, path: str) -> str:
    """The body of ``location <path>`` (its braces hold no nested blocks)."""
    return block(config, f"location {path}")


def directives(text: str, name: str) -> list[str]:
    """The arguments of every ``name`` directive in ``text``, comments left out."""
    return re.findall(rf"^\s*{re.escape(name)}\s+([^;]*);", re.sub(r"#.*", "", text), re.M)


def test_the_forwarded_for_header_is_the_address_nginx_saw_not_the_clients_claim(config):
    assert "$proxy_add_x_forwarded_for" not in config
    for path in ("/socket.io/", "/"):
        headers = directives(location(config, path), "proxy_set_header")
        assert headers.count("X-Forwarded-For $remote_addr") == 1, path


def test_socketio_connections_handshakes_and_requests_are_limited_per_address(config):
    zones = {zone: (key, rate) for key, zone, rate
             in re.findall(r"limit_req_zone (\S+) zone=(\w+):\S+ rate=(\S+);", config)}
    assert zones == {
        "realtime_handshakes": ("$realtime_handshake_client", "100r/s"),
        "realtime_socketio_requests": ("$binary_remote_addr", "1000r/s"),
        "realtime_http_requests": ("$binary_remote_addr", "5000r/s"),
    }
    assert directives(config, "limit_conn_zone") == [
        "$binary_remote_addr zone=realtime_socketio_conn:10m",
        "$binary_remote_addr zone=realtime_http_conn:10m"]
    socketio = location(config, "/socket.io/")
    assert directives(socketio, "limit_conn") == ["realtime_socketio_conn 2000"]
    assert directives(socketio, "limit_req") == [
        "zone=realtime_handshakes burst=2000 nodelay",
        "zone=realtime_socketio_requests burst=2000 nodelay"]
    # only requests without a sid naming a node are handshakes
    handshake_map = block(config, "map $realtime_node $realtime_handshake_client")
    assert directives(handshake_map, '""') == ["$binary_remote_addr"]
    assert directives(handshake_map, "default") == ['""']


def test_pages_and_the_api_are_limited_per_address(config):
    everything_else = location(config, "/")
    assert directives(everything_else, "limit_conn") == ["realtime_http_conn 512"]
    assert directives(everything_else, "limit_req") == [
        "zone=realtime_http_requests burst=5000 nodelay"]


def test_refusals_answer_429_with_the_json_error_of_the_nodes(config):
    assert directives(config, "limit_req_status") == ["429"]
    assert directives(config, "limit_conn_status") == ["429"]
    assert directives(config, "error_page") == ["429 @rate_limited"]
    # (its JSON has braces of its own: up to the end of the server block, not `block`)
    page = config[config.index("location @rate_limited {"):]
    assert directives(page, "default_type") == ["application/json"]
    (body,) = re.findall(r"return 429 '([^']*)';", page)
    error = json.loads(body.replace("\\n", "\n"))
    assert error["error"]["code"] == "rate_limited" and error["error"]["message"]
    # the named location is for refusals only: nothing is limited or proxied there
    assert "limit_" not in re.sub(r"#.*", "", page) and "proxy_pass" not in page

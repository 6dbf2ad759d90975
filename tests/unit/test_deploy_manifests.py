"""deploy/: the Kubernetes manifests are valid against Kubernetes' schemas (offline, with
kubernetes-validate's bundled schemas), the compose file has the structure it needs, and every
value that must agree with the app does: ports, probe paths, proxy timeouts against the
Engine.IO heartbeats, grace periods against the drain, nginx's upstreams against the nodes,
Redis's append-only file."""

from __future__ import annotations

import copy
import itertools
import math
import re
import shutil
import socket
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from werkzeug.test import Client

from realtime import gunicorn_config
from realtime.app import create_app
from realtime.config import Config
from realtime.server import LISTEN_BACKLOG

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# The oldest Kubernetes still commonly run, and the newest schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
DEFAULTS = Config()


def load_manifests() -> list[dict]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


MANIFESTS = load_manifests()


def manifest(kind: str, name: str) -> dict:
    found = [doc for doc in MANIFESTS
             if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} manifests"
    return found[0]


def container(workload: dict) -> dict:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def plain_env(spec: dict) -> dict[str, str]:
    """A container's environment variables that have a plain value, ``$(VAR)`` references
    replaced by a stand-in (Kubernetes expands them from variables defined before)."""
    return {item["name"]: re.sub(r"\$\([A-Z_]+\)", "secret", item["value"])
            for item in spec.get("env", []) if "value" in item}


def node_config(environment: dict[str, str]) -> Config:
    """The Config a node builds from ``environment`` (REALTIME_* variables)."""
    return Config.load(environ={k: v for k, v in environment.items()
                                if k.startswith("REALTIME_")})


def seconds(value: str | int) -> float:
    """A duration as Kubernetes annotations, compose and nginx write it: 75, "75s", "1m"."""
    match = re.fullmatch(r"(\d+)(s|m)?", str(value).strip())
    assert match, f"not a duration: {value!r}"
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


@pytest.fixture
def offline(monkeypatch):
    """No network: any connection or name lookup fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while validating: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# -- Kubernetes ---------------------------------------------------------------------------------


def test_the_kubernetes_manifests_are_every_object_a_deployment_needs():
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for doc in MANIFESTS)
    assert kinds == [("Deployment", "realtime"), ("HorizontalPodAutoscaler", "realtime"),
                     ("Ingress", "realtime"), ("PodDisruptionBudget", "realtime"),
                     ("Service", "realtime"), ("Service", "realtime-redis"),
                     ("StatefulSet", "realtime-redis")]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_kubernetes_manifest_is_valid_against_the_schemas_offline(offline, version):
    for document in MANIFESTS:
        # strict: a misspelled or misplaced field is an error, not ignored
        kubernetes_validate.validate(document, version, strict=True)


def test_the_schema_validation_rejects_a_misplaced_field(offline):
    broken = copy.deepcopy(manifest("Deployment", "realtime"))
    container(broken)["readinesProbe"] = container(broken).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_container_port_is_the_nodes_port_and_the_services_target():
    deployment = manifest("Deployment", "realtime")
    spec = container(deployment)
    (port,) = spec["ports"]
    config = node_config(plain_env(spec))
    assert port["containerPort"] == config.port == DEFAULTS.port
    assert config.host == "0.0.0.0"  # reachable from outside the pod
    service = manifest("Service", "realtime")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
    for probe in ("readinessProbe", "livenessProbe"):
        assert spec[probe]["httpGet"]["port"] in (port["name"], port["containerPort"])


def test_the_probe_paths_are_answered_by_a_real_node():
    spec = container(manifest("Deployment", "realtime"))
    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/healthz"
    realtime = create_app(Config(node_id="probe"))
    client = Client(realtime.wsgi)
    realtime.node.start()
    try:
        for probe in ("readinessProbe", "livenessProbe"):
            assert client.get(spec[probe]["httpGet"]["path"]).status_code == 200, probe
    finally:
        realtime.node.stop()


def test_the_grace_period_outlasts_the_prestop_sleep_and_gunicorns_drain():
    pod = manifest("Deployment", "realtime")["spec"]["template"]["spec"]
    spec = container(manifest("Deployment", "realtime"))
    config = node_config(plain_env(spec))
    command = spec["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    graceful_timeout = math.ceil(config.drain_timeout + gunicorn_config.DRAIN_MARGIN)
    assert graceful_timeout > config.drain_timeout
    assert pod["terminationGracePeriodSeconds"] > float(command[1]) + graceful_timeout


def test_the_ingress_is_sticky_and_waits_longer_than_the_heartbeats():
    config = node_config(plain_env(container(manifest("Deployment", "realtime"))))
    annotations = manifest("Ingress", "realtime")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "affinity"] == "cookie"
    assert annotations[prefix + "affinity-mode"] == "persistent"
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert seconds(annotations[prefix + timeout]) > config.ping_interval + config.ping_timeout
    assert annotations[prefix + "proxy-buffering"] == "off"


def test_the_nodes_secrets_come_from_a_secret_and_the_broker_is_the_redis_service():
    spec = container(manifest("Deployment", "realtime"))
    env = spec["env"]
    by_name = {item["name"]: item for item in env}
    for name in ("REALTIME_JWT_SECRET", "REALTIME_API_KEYS", "REDIS_PASSWORD"):
        assert by_name[name]["valueFrom"]["secretKeyRef"]["name"] == "realtime-secrets", name
    broker = by_name["REALTIME_BROKER"]["value"]
    # $(REDIS_PASSWORD) is expanded only from a variable defined before it
    assert "$(REDIS_PASSWORD)" in broker
    names = [item["name"] for item in env]
    assert names.index("REDIS_PASSWORD") < names.index("REALTIME_BROKER")
    redis_service = manifest("Service", "realtime-redis")
    (redis_port,) = redis_service["spec"]["ports"]
    assert f"@{redis_service['metadata']['name']}:{redis_port['port']}/" in broker


def test_the_autoscaler_and_the_disruption_budget_target_the_nodes():
    deployment = manifest("Deployment", "realtime")
    hpa = manifest("HorizontalPodAutoscaler", "realtime")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "realtime"}
    assert hpa["minReplicas"] >= 2
    # utilization is measured against the requests: there must be one
    assert container(deployment)["resources"]["requests"]["cpu"]
    pdb = manifest("PodDisruptionBudget", "realtime")["spec"]
    assert pdb["selector"] == deployment["spec"]["selector"]


def redis_flags(argv: list[str]) -> dict[str, str]:
    return {flag: value for flag, value in itertools.pairwise(argv)
            if flag.startswith("--")}


def test_the_kubernetes_redis_keeps_an_append_only_file_on_its_volume():
    statefulset = manifest("StatefulSet", "realtime-redis")
    spec = container(statefulset)
    flags = redis_flags([*spec.get("command", []), *spec.get("args", [])])
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "everysec"
    assert flags["--maxmemory-policy"] == "noeviction"
    (mount,) = spec["volumeMounts"]
    assert mount["mountPath"] == flags["--dir"]
    claims = [claim["metadata"]["name"] for claim in statefulset["spec"]["volumeClaimTemplates"]]
    assert claims == [mount["name"]]
    assert statefulset["spec"]["serviceName"] == "realtime-redis"


# -- docker compose -----------------------------------------------------------------------------


COMPOSE_FILE = DEPLOY / "docker-compose.yml"
# What `docker compose up` is given in the environment (the compose file requires it).
COMPOSE_ENV = {"REALTIME_API_KEYS": "test-key"}


def interpolate(value: object, environ: dict[str, str]) -> object:
    """Compose's variable interpolation (``${X}``, ``${X:-default}``, ``${X:?error}``)."""
    if isinstance(value, dict):
        return {key: interpolate(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        if environ.get(name):
            return environ[name]
        assert operator != ":?", f"compose requires {name}: {argument}"
        return argument if operator == ":-" else ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", substitute, value)


def compose_model() -> dict:
    """The compose file as Docker Compose reads it: `docker compose config` where it is
    installed (which validates it against the Compose specification), else PyYAML."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        done = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "config"],
                              capture_output=True, text=True, check=False, timeout=60,
                              env={**COMPOSE_ENV, "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        return yaml.safe_load(done.stdout)
    # (PyYAML resolves the file's anchors and merge keys as Compose does)
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), COMPOSE_ENV)


COMPOSE = compose_model()
NODE_SERVICES = {name: service for name, service in COMPOSE["services"].items()
                 if "REALTIME_NODE_ID" in (service.get("environment") or {})}


def test_compose_runs_redis_three_nodes_and_nginx():
    assert set(COMPOSE["services"]) == {"redis", "node1", "node2", "node3", "nginx"}
    assert sorted(NODE_SERVICES) == ["node1", "node2", "node3"]
    node_ids = [service["environment"]["REALTIME_NODE_ID"] for service in NODE_SERVICES.values()]
    assert sorted(node_ids) == ["n1", "n2", "n3"]
    for name, service in NODE_SERVICES.items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile", name
        assert node_config(service["environment"]).broker == \
            "redis://redis:6379/0"
        assert "redis" in service["depends_on"], name
        assert "/readyz" in " ".join(service["healthcheck"]["test"]), name
    assert set(COMPOSE["services"]["nginx"]["depends_on"]) == set(NODE_SERVICES)


def test_compose_redis_keeps_an_append_only_file_on_a_volume():
    redis = COMPOSE["services"]["redis"]
    flags = redis_flags(redis["command"])
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "everysec"
    assert any(str(volume).endswith(":/data") or (isinstance(volume, dict)
                                                   and volume.get("target") == "/data")
               for volume in redis["volumes"])


def test_compose_gives_each_node_longer_than_gunicorns_drain_to_stop():
    for name, service in NODE_SERVICES.items():
        config = node_config(service["environment"])
        graceful_timeout = math.ceil(config.drain_timeout + gunicorn_config.DRAIN_MARGIN)
        assert seconds(service["stop_grace_period"]) > graceful_timeout, name


def test_compose_nodes_trust_nginx_and_only_nginx():
    nginx_address = COMPOSE["services"]["nginx"]["networks"]["default"]["ipv4_address"]
    for name, service in NODE_SERVICES.items():
        assert service["environment"]["REALTIME_TRUSTED_PROXIES"] == nginx_address, name


def test_compose_nginx_conf_is_the_shipped_template_rendered_for_its_nodes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_compose_nginx",
                                                  DEPLOY / "render_compose_nginx.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    committed = (DEPLOY / "nginx.conf").read_text()
    assert committed == render.render(yaml.safe_load(COMPOSE_FILE.read_text())), \
        "deploy/nginx.conf is stale: run deploy/render_compose_nginx.py"
    # nginx's upstreams are exactly the compose nodes, at their ports
    upstream_all = re.search(r"upstream realtime_all \{(.*?)\}", committed, re.S).group(1)
    servers = re.findall(r"server (\S+) max_fails", upstream_all)
    assert sorted(servers) == sorted(
        f"{name}:{node_config(s['environment']).port}"
        for name, s in NODE_SERVICES.items())
    routed = dict(re.findall(r"^\s*(n\d) realtime_node_(n\d);", committed, re.M))
    assert routed == {s["environment"]["REALTIME_NODE_ID"]: s["environment"]["REALTIME_NODE_ID"]
                      for s in NODE_SERVICES.values()}
    for node_id, name in ((s["environment"]["REALTIME_NODE_ID"], n)
                          for n, s in NODE_SERVICES.items()):
        assert re.search(rf"upstream realtime_node_{node_id} \{{\s*server {name}:",
                         committed), node_id
    # the nodes' heartbeats fit in nginx's proxy timeouts
    for name, service in NODE_SERVICES.items():
        config = node_config(service["environment"])
        for timeout in re.findall(r"proxy_(?:read|send)_timeout (\S+);",
                                  committed.split("location / {")[0]):
            assert seconds(timeout) > config.ping_interval + config.ping_timeout, name
    # mounted where the nginx image reads its configuration
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in COMPOSE["services"]["nginx"]["volumes"]


# -- Dockerfile ---------------------------------------------------------------------------------


def test_the_image_installs_the_package_and_runs_gunicorn_on_the_nodes_port():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    instructions = [line.strip() for line in dockerfile.replace("\\\n", " ").splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    assert any(re.search(r"\bpip install\b[^&]*\s\.(\s|$)", line) for line in instructions)
    env = dict(re.findall(r"(REALTIME_[A-Z_]+)=(\S+)", dockerfile))
    config = node_config(env)
    assert config.port == DEFAULTS.port and config.host == "0.0.0.0"
    assert f"EXPOSE {config.port}" in instructions
    cmd = next(line for line in instructions if line.startswith("CMD "))
    assert cmd == ('CMD ["gunicorn", "-c", "python:realtime.gunicorn_config", '
                   '"realtime.gunicorn_worker:create_node()"]')
    assert any(line.startswith("USER ") and line != "USER root" for line in instructions)


def test_gunicorn_listens_with_the_backlog_of_run_py_serve():
    assert gunicorn_config.LISTEN_BACKLOG == LISTEN_BACKLOG == gunicorn_config.backlog


def test_nginx_accepts_the_compose_nginx_conf(tmp_path):
    """``nginx -t`` on deploy/nginx.conf, with the compose hosts (which only Docker's DNS
    knows) made loopback addresses and the image's prefix made a temporary one."""
    from realtime_dev.nginx import nginx_command
    from realtime_dev.processes import find_executable

    config = (DEPLOY / "nginx.conf").read_text()
    for name in NODE_SERVICES:
        config = config.replace(f" {name}:", " 127.0.0.1:")
    config = config.replace('"/var/cache/nginx/', f'"{tmp_path}/')
    conf = tmp_path / "nginx.conf"
    conf.write_text(config)
    result = subprocess.run([*nginx_command(find_executable("nginx"), tmp_path, conf), "-t"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr

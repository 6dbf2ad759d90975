"""Render deploy/nginx.conf, nginx's config in docker-compose.yml, from the shipped template.

    .venv/bin/python deploy/render_compose_nginx.py

The nodes come from docker-compose.yml itself (every service with a ``REALTIME_NODE_ID``, at
its service name and ``REALTIME_PORT``), so nginx's upstreams are the compose file's nodes;
tests/unit/test_deploy_manifests.py checks that the committed nginx.conf is this rendering.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
NGINX_CONF = DEPLOY / "nginx.conf"
# In the official nginx image: /var/cache/nginx exists and holds nginx's temp directories.
NGINX_PREFIX = "/var/cache/nginx"
NGINX_LISTEN = "80"
# nginx has the container to itself: a worker per core; both sides of 20000 connections each.
NGINX_WORKER_PROCESSES = "auto"
NGINX_WORKER_RLIMIT_NOFILE = 45000


def compose_nodes(compose: dict) -> dict[str, str]:
    """Node id -> ``service:port`` of every compose service that is a realtime node."""
    nodes = {}
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        if "REALTIME_NODE_ID" in environment:
            port = environment.get("REALTIME_PORT", "5000")
            nodes[str(environment["REALTIME_NODE_ID"])] = f"{name}:{port}"
    return nodes


def render(compose: dict) -> str:
    """nginx.conf for the nodes of ``compose`` (the parsed docker-compose.yml)."""
    sys.path.insert(0, str(REPO))
    from realtime_dev.nginx import render_nginx_config

    return render_nginx_config(compose_nodes(compose), NGINX_LISTEN, NGINX_PREFIX,
                               worker_processes=NGINX_WORKER_PROCESSES,
                               worker_rlimit_nofile=NGINX_WORKER_RLIMIT_NOFILE)


def main() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    NGINX_CONF.write_text(render(compose))
    print(f"wrote {NGINX_CONF} for nodes {', '.join(compose_nodes(compose))}")


if __name__ == "__main__":
    main()

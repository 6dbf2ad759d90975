"""The installable package: a wheel built from the checkout (``pip wheel .``), installed into a
fresh virtualenv, runs ``realtime serve`` and ``realtime cluster`` with the pages it carries,
from a directory outside the checkout and with the checkout nowhere on ``sys.path``."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import requests
from packaging.requirements import Requirement

from realtime.resources import CLIENT_BUNDLE
from realtime_dev.processes import (
    ManagedProcess,
    ProcessError,
    find_executable,
    free_port,
    http_ok,
    wait_for,
)
from tests.helpers import REPO
from tests.integration.clients import connect_client

BUILD_TIMEOUT = 180.0
START_TIMEOUT = 30.0
# A line only the installed copy of the chat page has: what is served came from the venv.
INSTALLED_MARK = "<!-- the installed copy -->"


def run(argv: list[str], timeout: float = BUILD_TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    """Run ``argv`` to its end; fail the test with its output unless it exits with 0."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                            **kwargs)
    assert result.returncode == 0, (f"{argv} exited with {result.returncode}:\n"
                                    f"{result.stdout}\n{result.stderr}")
    return result


def pages_of_the_checkout() -> list[str]:
    """The files under static/ that the wheel must carry, relative to static/."""
    static = REPO / "static"
    return sorted(
        path.relative_to(static).as_posix() for path in static.rglob("*")
        if path.is_file() and path.name not in ("package.json", "package-lock.json")
        and not any(part.startswith(".") or part == "node_modules"
                    for part in path.relative_to(static).parts))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q",
         "--disable-pip-version-check", "-w", str(out)])
    (built,) = out.glob("realtime-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv (no system site-packages) with the wheel and its dependencies."""
    root = tmp_path_factory.mktemp("venv")
    # Without its own pip: the tests' pip installs into it (--python), which saves ensurepip's
    # seconds. Dependencies come from the index (pip's cache makes that quick), held to the
    # versions of requirements.txt; a dependency missing from the wheel's metadata would leave
    # the node unable to start.
    run([sys.executable, "-m", "venv", "--without-pip", str(root)])
    run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install", "-q",
         "--disable-pip-version-check", "-c", str(REPO / "requirements.txt"), str(wheel)])
    index = installed_pages(root) / "index.html"
    index.write_text(index.read_text() + INSTALLED_MARK + "\n")
    return root


def installed_pages(venv: Path) -> Path:
    """The pages folder inside the virtualenv's copy of realtime."""
    (pages,) = venv.glob("lib/python*/site-packages/realtime/static")
    return pages


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory outside the checkout."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert REPO not in cwd.parents
    return cwd


@pytest.fixture(scope="module")
def clean_env() -> dict[str, str]:
    """This environment without anything that would put the checkout on ``sys.path``."""
    return {name: value for name, value in os.environ.items()
            if name not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}


def test_the_wheel_carries_the_pages_the_client_bundle_and_no_other_npm_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for page in pages_of_the_checkout():
        assert f"realtime/static/{page}" in names
    assert f"realtime/static/{CLIENT_BUNDLE.as_posix()}" in names
    assert [n for n in names if "node_modules" in n] == [
        f"realtime/static/{CLIENT_BUNDLE.as_posix()}"]
    assert not [n for n in names if n.endswith(("package.json", "package-lock.json"))]
    assert "realtime_dev/templates/realtime.conf.template" in names
    assert {"realtime/__main__.py", "realtime_dev/cluster.py", "realtime_dev/processes.py"} <= names


def test_the_wheel_declares_a_realtime_command_and_dependencies_that_admit_the_pins(wheel):
    archive = zipfile.ZipFile(wheel)
    info = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = archive.read(info).decode()
    entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert re.search(r"^realtime = realtime\.__main__:run$", entry_points, re.M)
    pins = {Requirement(line).name.lower(): Requirement(line) for line in
            (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    declared = [Requirement(value) for value in
                re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)]
    assert {"flask", "gevent", "redis", "hiredis", "msgpack", "pyjwt", "cryptography"} <= {
        r.name.lower() for r in declared}
    for requirement in declared:
        (pinned,) = pins[requirement.name.lower()].specifier
        assert requirement.specifier.contains(pinned.version), (requirement, pinned)


def test_installed_realtime_serves_its_own_pages_away_from_the_checkout(venv, elsewhere,
                                                                         clean_env):
    probe = run([str(venv / "bin" / "python"), "-c", (
        "import json, sys, realtime, realtime_dev; from realtime.resources import pages_dir; "
        "print(json.dumps({'realtime': realtime.__file__, 'realtime_dev': realtime_dev.__file__,"
        " 'pages': str(pages_dir()), 'path': sys.path}))")], cwd=elsewhere, env=clean_env)
    found = json.loads(probe.stdout)
    for name in ("realtime", "realtime_dev", "pages"):
        assert venv in Path(found[name]).parents, found
    assert not [entry for entry in found["path"] if entry.startswith(str(REPO))]
    pages = Path(found["pages"])
    assert pages == installed_pages(venv)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    node = ManagedProcess("installed node", [
        str(venv / "bin" / "realtime"), "serve", "--port", str(port), "--node-id", "pkg",
        "--drain-timeout", "1"], elsewhere / "node.log", env=clean_env, cwd=elsewhere)
    try:
        wait_ready(node, url)
        assert INSTALLED_MARK in requests.get(url + "/", timeout=5).text
        page = requests.get(url + "/notifications.html", timeout=5)
        assert page.status_code == 200
        assert page.content == (pages / "notifications.html").read_bytes()
        bundle = requests.get(url + "/vendor/socket.io.min.js", timeout=5)
        assert bundle.status_code == 200
        assert bundle.content == (REPO / "static" / CLIENT_BUNDLE).read_bytes()
        assert requests.get(url + "/healthz", timeout=5).json() == {"status": "ok"}
        client = connect_client(url, "websocket", "packaged")
        try:
            assert client.call("subscribe", {"channel": "pkg:news"}, timeout=10)["ok"]
        finally:
            client.disconnect()
    finally:
        code = node.stop()
    assert code == 0, node.log()


def test_installed_realtime_command_has_help_for_serve_and_cluster(venv, elsewhere, clean_env):
    realtime = str(venv / "bin" / "realtime")
    top = run([realtime, "--help"], timeout=30, cwd=elsewhere, env=clean_env).stdout
    assert top.startswith("usage: realtime ") and "serve" in top and "cluster" in top
    serve = run([realtime, "serve", "--help"], timeout=30, cwd=elsewhere, env=clean_env).stdout
    assert "--static-dir" in serve and "--port" in serve
    cluster = run([realtime, "cluster", "--help"], timeout=30, cwd=elsewhere,
                  env=clean_env).stdout
    assert cluster.startswith("usage: realtime cluster ") and "--nodes" in cluster


def test_installed_realtime_cluster_runs_installed_nodes_behind_nginx(venv, elsewhere,
                                                                      clean_env):
    find_executable("nginx")
    find_executable("redis-server")
    with open(elsewhere / "cluster.out", "wb") as out:
        command = subprocess.Popen(
            [str(venv / "bin" / "realtime"), "cluster", "--nodes", "1", "--port", "0"],
            stdout=out, stderr=subprocess.STDOUT, cwd=elsewhere, env=clean_env,
            start_new_session=True)
    output = elsewhere / "cluster.out"
    try:
        def chat_page() -> str | None:
            if command.poll() is not None:
                raise ProcessError(f"realtime cluster exited with {command.returncode}:\n"
                                   + output.read_text())
            match = re.search(r"^  chat page +(\S+)", output.read_text(), re.M)
            return match.group(1) if match else None

        url = wait_for(chat_page, START_TIMEOUT, "realtime cluster to be ready")
        # The node behind nginx runs the installed realtime: the page is the installed one.
        assert INSTALLED_MARK in requests.get(url + "/", timeout=5).text
        command.send_signal(signal.SIGTERM)
        assert command.wait(30) == 0, output.read_text()
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait(10)


def test_the_build_fails_clearly_without_the_client_bundle(tmp_path):
    source = tmp_path / "source"
    for name in ("realtime", "realtime_dev", "nginx"):
        shutil.copytree(REPO / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "static", source / "static",
                    ignore=shutil.ignore_patterns("node_modules"))
    for name in ("pyproject.toml", "hatch_build.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q",
         "--disable-pip-version-check", "-w", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    assert result.returncode != 0
    assert "the Socket.IO client bundle" in result.stdout + result.stderr
    assert "npm install --prefix static" in result.stdout + result.stderr
    assert not list(tmp_path.glob("out/*.whl"))


def wait_ready(node: ManagedProcess, url: str) -> None:
    def ready() -> bool:
        if not node.alive():
            raise ProcessError(f"{node.name} exited:\n{node.log()}")
        return http_ok(url + "/readyz")

    wait_for(ready, START_TIMEOUT, f"{node.name} to be ready")

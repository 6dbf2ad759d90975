"""Build hook (hatchling): puts the pages, the official client bundle and the nginx template
into the wheel, where the installed package finds them, and refuses to build without the bundle.

The sources stay where the checkout has them (``static/``, ``nginx/``); in the wheel they become
``realtime/static/`` (with the bundle at the same relative path as in the checkout, so that the
node serves it the same way) and ``realtime_dev/templates/realtime.conf.template``. Of
``static/node_modules`` only the bundle goes in: the rest is npm's, needed by nobody at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

CLIENT_BUNDLE = "node_modules/socket.io-client/dist/socket.io.min.js"
# npm's files in static/, not pages.
NOT_PAGES = {"package.json", "package-lock.json"}


class StaticFilesHook(BuildHookInterface):
    """Adds static/ (pages and the client bundle) and the nginx template as package data."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        static = root / "static"
        bundle = static / CLIENT_BUNDLE
        if not bundle.is_file():
            raise RuntimeError(
                f"cannot build realtime: the Socket.IO client bundle {bundle} is missing. "
                "Install it first with `scripts/setup` (or `npm install --prefix static`).")
        if self.target_name == "sdist":
            return  # the sdist takes static/ as it is, by its include list
        # Every file under static/ (pages added later included), subfolders too, but none of
        # node_modules and no hidden file (.gitignore).
        pages = sorted(path for path in static.rglob("*")
                       if path.is_file() and path.name not in NOT_PAGES
                       and not _hidden_or_npm(path.relative_to(static)))
        force_include = build_data["force_include"]
        for page in pages:
            force_include[str(page)] = f"realtime/static/{page.relative_to(static).as_posix()}"
        force_include[str(bundle)] = f"realtime/static/{CLIENT_BUNDLE}"
        force_include[str(root / "nginx" / "realtime.conf.template")] = \
            "realtime_dev/templates/realtime.conf.template"


def _hidden_or_npm(relative: Path) -> bool:
    return relative.parts[0] == "node_modules" or any(
        part.startswith(".") for part in relative.parts)

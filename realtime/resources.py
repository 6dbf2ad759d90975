"""Where a node finds the files it serves: the browser pages and the official client bundle.

An installed realtime carries them as package data (``realtime/static/``, put there by the
build: see hatch_build.py); a source checkout has them in its top-level ``static/`` folder,
with the client bundle installed by npm into ``static/node_modules/``. Nothing here looks into
a checkout unless realtime runs from one.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from .config import ConfigError

# The official client, at the same path under the pages folder in a checkout (where npm puts it)
# and in the installed package.
CLIENT_BUNDLE = Path("node_modules/socket.io-client/dist/socket.io.min.js")


def pages_dir() -> Path:
    """The folder of the pages: the installed package's, else the source checkout's ``static/``.

    Raises ConfigError when there is neither (a package built without its pages): the node
    would answer every page with 404.
    """
    packaged = importlib.resources.files(__package__) / "static"
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent
    # A checkout is recognised by its project file next to the package and its static/ folder.
    if (checkout / "pyproject.toml").is_file() and (checkout / "static").is_dir():
        return checkout / "static"
    raise ConfigError(f"realtime's pages are not installed with it (no {packaged}) and it does "
                      "not run from a source checkout: reinstall it, or give --static-dir")

"""Entry point of the installed ``realtime`` command and of ``python -m realtime``.

An entry point, like run.py: it patches for gevent before anything else is imported.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from realtime.cli import main  # noqa: E402


def run() -> int:
    """The ``realtime`` console script: ``realtime serve ...``, ``realtime cluster ...``."""
    return main(prog="realtime")


if __name__ == "__main__":
    sys.exit(run())

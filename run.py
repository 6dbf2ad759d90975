"""Entry point: ``python run.py`` runs one node; ``python run.py --help`` for the commands."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from realtime.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

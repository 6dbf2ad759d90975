"""gunicorn settings for one realtime node: ``gunicorn -c python:realtime.gunicorn_config``.

Every name below is a gunicorn setting (gunicorn ignores the others). They come from the node's
own :class:`~realtime.config.Config` (defaults, ``REALTIME_CONFIG``'s TOML file, ``REALTIME_*``
variables), so that gunicorn listens where the node is configured to and waits for its drain:

* ``bind``: ``REALTIME_HOST``:``REALTIME_PORT`` (127.0.0.1:5000 by default);
* ``workers`` 1 and ``worker_class`` :class:`realtime.gunicorn_worker.RealtimeWorker`: one node
  per process (the worker refuses anything else);
* ``graceful_timeout``: ``drain_timeout`` + :data:`DRAIN_MARGIN` seconds;
* ``backlog``: the listen backlog of ``run.py serve``.

A flag given to gunicorn after ``-c`` still wins over these (``-b 0.0.0.0:8000``); the worker
checks that the result still makes one node that can drain.
"""

from __future__ import annotations

import math

from realtime.config import Config

# Only realtime.config is imported here: the master must not import the node's modules (they
# import ssl and threading) before the worker patches gevent in.

# The listen backlog of run.py serve (realtime.server.LISTEN_BACKLOG, which a test compares).
LISTEN_BACKLOG = 4096
# Seconds gunicorn's master waits past the node's drain_timeout before it kills the worker: the
# drain's last clean-up (presence removal, the broker's goodbye) happens after the timeout.
DRAIN_MARGIN = 5

_node = Config.load()

bind = [f"[{_node.host}]:{_node.port}" if ":" in _node.host else f"{_node.host}:{_node.port}"]
workers = 1
worker_class = "realtime.gunicorn_worker.RealtimeWorker"
wsgi_app = "realtime.gunicorn_worker:create_node()"
# (gunicorn takes whole seconds)
graceful_timeout = math.ceil(_node.drain_timeout + DRAIN_MARGIN)
backlog = LISTEN_BACKLOG
preload_app = False
loglevel = _node.log_level
# gunicorn's control socket (gunicornc) is one path per user by default: two nodes on a
# machine would share it. A node is driven by signals, as run.py serve is.
control_socket_disable = True
# The node logs what matters itself; a line per long-polling request would drown it.
accesslog = None

"""Running a node under gunicorn: a worker class of realtime's own and the app factory.

::

    gunicorn -c python:realtime.gunicorn_config 'realtime.gunicorn_worker:create_node()'

One gunicorn master runs one worker, and that worker is one node: the same
:class:`~realtime.server.RealtimeServer` and :class:`~realtime.server.RealtimeHandler` as
``run.py serve`` (WebSocket upgrades handed straight to the engine, the request timeouts and the
connection cap), on the listening socket gunicorn opened, and the same drain on SIGTERM. The
node reads its configuration as ``run.py serve`` does, less the command line (gunicorn owns
it): the defaults, the TOML file of ``REALTIME_CONFIG`` (or ``create_node(config_file=...)``),
then ``REALTIME_*`` variables.

Signals follow gunicorn's meaning. SIGTERM to the master closes its listener and sends SIGTERM
to the worker, which drains (:func:`realtime.server.drain`: ``/readyz`` 503 at once, its
listener closed, sessions closed by their transport over ``drain_timeout``, requests in flight
answered) and exits 0; the master then exits 0. gunicorn kills the worker after
``graceful_timeout``, which must therefore be longer than ``drain_timeout`` (the worker refuses
to boot otherwise). SIGINT or SIGQUIT (gunicorn's quick shutdown) cut the drain short, like a
second SIGTERM to ``run.py serve``.

Why not gunicorn's own gevent workers: their pywsgi handler has no way to hand a WebSocket
upgrade to the engine (the raw socket), and gevent-websocket would be a second WebSocket
implementation beside realtime's own.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable
from typing import TYPE_CHECKING

import gevent
import gevent.event
from gunicorn.workers.ggevent import GeventWorker

from .config import Config, ConfigError

if TYPE_CHECKING:
    from .app import Realtime, StartResponse
    from .server import RealtimeServer

# gunicorn's master imports this module (to find the worker class) long before a worker patches
# gevent in: the node's own modules (Flask, redis, PyJWT, which import ssl and threading) are
# imported in the worker, after the patching, and never in the master.

logger = logging.getLogger(__name__)

# Seconds between the worker's heartbeats to the master (gunicorn's own gevent worker uses 1 s;
# the master kills a worker silent for its `timeout`).
HEARTBEAT_INTERVAL = 1.0


class GunicornNode:
    """What :func:`create_node` gives gunicorn: the node's WSGI application, with the node.

    Only :class:`RealtimeWorker` serves it: it needs the node started, its WebSocket upgrades
    handed to the engine, and its drain; another worker class gets a 500 with the reason.
    """

    def __init__(self, realtime: Realtime) -> None:
        self.realtime = realtime
        self.config: Config = realtime.config
        self.served = False  # set by RealtimeWorker once the node is started

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        if not self.served:
            raise RuntimeError("realtime.gunicorn_worker:create_node() is served by "
                               "worker_class realtime.gunicorn_worker.RealtimeWorker only "
                               "(gunicorn -c python:realtime.gunicorn_config)")
        return self.realtime.wsgi(environ, start_response)


def create_node(config_file: str | None = None) -> GunicornNode:
    """gunicorn's app factory: ``'realtime.gunicorn_worker:create_node()'``.

    Builds the node from the defaults, ``config_file`` (default: ``REALTIME_CONFIG``) and the
    ``REALTIME_*`` environment; nothing is started (the worker does that). Called in the worker
    after gevent's monkey patching, which it checks. Raises ConfigError on a bad setting.
    """
    from .app import create_app
    from .logs import configure_logging
    from .server import check_monkey_patched

    check_monkey_patched()
    config = Config.load(config_file=config_file)
    configure_logging(config.log_level, config.log_format, config.node_id)
    return GunicornNode(create_app(config))


class RealtimeWorker(GeventWorker):
    """gunicorn worker that runs one realtime node (see the module docstring).

    gevent's monkey patching is done by :class:`GeventWorker` first thing in the worker
    process (``init_process``), before the app factory runs. The worker refuses to boot (exit
    status 3, which stops the master) when the settings cannot make one node: more than one
    worker or listener, ``preload_app``, a ``graceful_timeout`` not longer than the node's
    ``drain_timeout``, or an app that is not :func:`create_node`'s.
    """

    server: RealtimeServer

    def load_wsgi(self) -> None:
        from .server import node_server

        cfg = self.cfg
        if cfg.workers != 1:
            raise ConfigError(f"gunicorn runs one realtime node per worker, and a node per "
                              f"process: workers must be 1, not {cfg.workers} (run more "
                              f"gunicorn masters, each with its own REALTIME_NODE_ID and port)")
        if cfg.preload_app:
            raise ConfigError("preload_app would build the node in the master, before gevent's "
                              "monkey patching: leave it off")
        if len(self.sockets) != 1:
            raise ConfigError(f"a node listens on one address: bind gives {len(self.sockets)}")
        super().load_wsgi()
        node = self.wsgi
        if not isinstance(node, GunicornNode):
            raise ConfigError("RealtimeWorker serves 'realtime.gunicorn_worker:create_node()' "
                              f"only, not {type(node).__name__}")
        drain_timeout = node.config.drain_timeout
        if cfg.graceful_timeout <= drain_timeout:
            raise ConfigError(f"gunicorn's graceful_timeout ({cfg.graceful_timeout:g} s) must be "
                              f"longer than the node's drain_timeout ({drain_timeout:g} s), or "
                              f"the master kills the node in the middle of its drain")
        # Here rather than in run(): a failure still counts as a failed boot, which stops the
        # master, instead of a crash that gunicorn answers with a new worker, forever.
        listener = self.sockets[0]
        listener.setblocking(1)  # gevent's cooperative blocking, as GeventWorker sets it
        self.server = node_server(node.config, node.realtime, listener)

    def run(self) -> None:
        from .server import drain, settle_heap

        node: GunicornNode = self.wsgi
        realtime, config = node.realtime, node.config
        server = self.server
        realtime.start()
        node.served = True
        stop_asked = gevent.event.Event()
        cut_short = gevent.event.Event()

        def on_signal(signum: int) -> None:
            name = signal.Signals(signum).name
            if signum != signal.SIGTERM or stop_asked.is_set():
                logger.info("received %s: stopping now", name)
                cut_short.set()
                stop_asked.set()
                return
            logger.info("received %s: draining (%d sessions, up to %g s; SIGQUIT stops at "
                        "once)", name, realtime.engine.session_count, config.drain_timeout)
            stop_asked.set()

        # libev's handlers replace the ones gunicorn's Worker installed (which would only set
        # self.alive, or sys.exit from inside a signal handler).
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            gevent.signal_handler(signum, on_signal, signum)
        heartbeat = gevent.spawn(self._heartbeat)
        settle_heap()
        server.start()
        try:
            stop_asked.wait()
            self.alive = False
            drain(server, realtime, config.drain_timeout, cut_short)
        finally:
            heartbeat.kill()
        logger.info("node %s stopped", config.node_id)

    def _heartbeat(self) -> None:
        """Tell the master this worker lives, through the drain too: a worker sent SIGTERM
        alone (not by a stopping master) is still watched for gunicorn's ``timeout``."""
        while True:
            try:
                self.notify()  # exits the process when the master is gone (GeventWorker)
            except Exception:
                logger.exception("the heartbeat to gunicorn's master failed")
            gevent.sleep(HEARTBEAT_INTERVAL)

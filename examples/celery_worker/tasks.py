"""A Celery worker that notifies users through realtime's emitter (no HTTP hop).

The tasks publish on ``user:<id>``, the personal channel only that user may subscribe to, by
writing to the realtime cluster's Redis with :class:`realtime.emitter.Emitter`: the same Lua
script, offsets and history as ``POST /api/publish``. Celery's own broker is Redis too; it may
be the same server (another database) or another one.

Run it (the worker from this folder, with realtime importable: ``pip install`` it, or
``PYTHONPATH=../..`` in a checkout)::

    redis-server --port 6380                       # or your Redis
    python run.py serve --broker redis://127.0.0.1:6380/0    # from the checkout's root; or cluster
    CELERY_BROKER_URL=redis://127.0.0.1:6380/1 REALTIME_REDIS_URL=redis://127.0.0.1:6380/0 \\
        celery -A tasks worker --loglevel=info

and from any Python process with the same environment::

    from tasks import notify_user, notify_users
    notify_user.delay("alice", {"title": "Your order shipped", "order": 42})
    notify_users.delay([{"user": "alice", "data": {"title": "Maintenance at 22:00"}},
                        {"user": "bob", "data": {"title": "Your invoice", "amount": 12}}])

A client connected as ``alice`` and subscribed to ``user:alice`` receives the ``message``
``{channel: "user:alice", offset, data: {...}, user: null}``.

Environment: ``CELERY_BROKER_URL`` (Celery's broker), ``CELERY_RESULT_BACKEND`` (optional:
where ``.get()`` finds a task's answer), ``REALTIME_REDIS_URL`` (the realtime nodes' broker)
and ``REALTIME_CONFIG`` (optional: the nodes' TOML file, so that the emitter keeps the same
history sizes and message limits as the nodes).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_shutdown

from realtime.config import Config
from realtime.emitter import Emitter, PublishRequest
from realtime.errors import RealtimeError, Unavailable

# Celery finds the app under this name (`celery -A tasks`): its idiom is a module-level app.
app = Celery(
    "notifications",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1"),
    backend=os.environ.get("CELERY_RESULT_BACKEND") or None,
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # A notification is acknowledged once it is published: a worker that dies half-way leaves
    # it to another one, and the idempotency key below keeps that from publishing twice.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    broker_connection_retry_on_startup=True,
)


@functools.cache
def emitter() -> Emitter:
    """This worker process's emitter, made on first use (after the fork) and shared by threads."""
    url = os.environ.get("REALTIME_REDIS_URL", "redis://127.0.0.1:6379/0")
    config_file = os.environ.get("REALTIME_CONFIG")
    config = Config.load(config_file=config_file) if config_file else None
    return Emitter(url, config=config)


@worker_process_shutdown.connect
def _close_emitter(**_: Any) -> None:
    if emitter.cache_info().currsize:
        emitter().close()


@app.task(bind=True, autoretry_for=(Unavailable,), retry_backoff=True, max_retries=5)
def notify_user(self, user: str, data: Any) -> dict:
    """Publish ``data`` on ``user:<user>``; return its ``{channel, epoch, offset}``.

    Retried with back-off while realtime's Redis is unavailable. The task id is the publish's
    idempotency key, so a retry (or a redelivery after a worker died) never notifies twice.
    """
    position = emitter().publish(f"user:{user}", data, idempotency_key=self.request.id)
    return {"channel": f"user:{user}", "epoch": position.epoch, "offset": position.offset}


@app.task(bind=True, retry_backoff=True, max_retries=5)
def notify_users(self, notifications: list[dict]) -> list[dict]:
    """Publish a batch of ``{user, data}`` notifications in one round trip to Redis.

    Returns, in order, ``{channel, epoch, offset}`` per notification, or ``{channel, error:
    {code, message}}`` for one that was refused (bad data, too large): one bad notification
    does not stop the others. When Redis was unavailable for some, the whole task is retried
    with back-off; each notification's idempotency key (the task id and its index) makes the
    retry publish only those that were missed.
    """
    channels = [f"user:{item['user']}" for item in notifications]
    batch = [PublishRequest(channel, item["data"], idempotency_key=f"{self.request.id}:{index}")
             for index, (channel, item) in enumerate(zip(channels, notifications, strict=True))]
    results = emitter().publish_many(batch)
    unavailable = [result for result in results if isinstance(result, Unavailable)]
    if unavailable:
        raise self.retry(exc=unavailable[0], countdown=2 ** self.request.retries)
    return [{"channel": channel, "error": result.to_dict()}
            if isinstance(result, RealtimeError)
            else {"channel": channel, "epoch": result.epoch, "offset": result.offset}
            for channel, result in zip(channels, results, strict=True)]

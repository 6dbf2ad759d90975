"""A receiver of realtime's webhooks: verifies each request, de-duplicates events, records them.

realtime POSTs ``{time_ms, events: [{id, name, channel?, user?}, ...]}`` to every
``--webhook-url``, signed with ``--webhook-secret``: the header ``X-Realtime-Signature`` is the
hex HMAC-SHA256 of the raw body. Delivery is at-least-once (a batch whose answer was lost comes
again), so the receiver keeps each event's ``id`` and acts on an event once. This one records
every event in SQLite and keeps, per user, whether they are online and when they last went
offline (``user_offline`` comes once the user's last connection has been closed for
``--offline-grace`` seconds, so a page reload is not an offline).

Run it (from this folder) beside a node or a cluster::

    WEBHOOK_SECRET=change-me WEBHOOK_DB=webhooks.sqlite3 flask --app receiver run --port 8001
    python run.py serve --webhook-url http://127.0.0.1:8001/realtime/webhooks \\
        --webhook-secret change-me            # better: REALTIME_WEBHOOK_SECRET in the env

then connect a client as ``alice`` and close it: a few seconds later
``curl 127.0.0.1:8001/users/alice`` says ``{"user": "alice", "online": false, ...}``.

Answer 2xx only once an event is safely stored: anything else makes realtime retry the batch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
from typing import Any

from flask import Flask, abort, g, jsonify, request

SIGNATURE_HEADER = "X-Realtime-Signature"

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,            -- the event's id: a duplicate delivery is ignored
    name TEXT NOT NULL,
    channel TEXT,
    user TEXT,
    time_ms INTEGER NOT NULL,       -- when the node sent the batch
    deliveries INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS users (
    user TEXT PRIMARY KEY,
    online INTEGER NOT NULL,
    changed_ms INTEGER NOT NULL,    -- time_ms of the batch that set `online`
    last_offline_ms INTEGER
);
"""


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Realtime-Signature`` of ``body``: hex HMAC-SHA256 with ``secret``."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is the signature of ``body`` (compared in constant time)."""
    return header is not None and hmac.compare_digest(signature(secret, body),
                                                      header.strip().lower())


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The receiver, configured from ``WEBHOOK_SECRET`` and ``WEBHOOK_DB``, then ``config``."""
    app = Flask(__name__)
    app.config.update(WEBHOOK_SECRET=os.environ.get("WEBHOOK_SECRET", ""),
                      WEBHOOK_DB=os.environ.get("WEBHOOK_DB", "webhooks.sqlite3"))
    app.config.update(config or {})
    if not app.config["WEBHOOK_SECRET"]:
        raise RuntimeError("set WEBHOOK_SECRET: the receiver refuses unsigned webhooks")
    secret = app.config["WEBHOOK_SECRET"].encode()
    with sqlite3.connect(app.config["WEBHOOK_DB"]) as db:
        db.executescript(SCHEMA)

    def database() -> sqlite3.Connection:
        if "db" not in g:
            # One connection per request; WAL lets readers go on while a batch is written.
            g.db = sqlite3.connect(app.config["WEBHOOK_DB"], timeout=10)
            g.db.execute("PRAGMA journal_mode=WAL")
            g.db.row_factory = sqlite3.Row
        return g.db

    @app.teardown_appcontext
    def close_database(_: BaseException | None) -> None:
        db = g.pop("db", None)
        if db is not None:
            db.close()

    @app.post("/realtime/webhooks")
    def receive():
        body = request.get_data(cache=False)  # the raw bytes: the signature is over them
        if not verify(secret, body, request.headers.get(SIGNATURE_HEADER)):
            abort(401)
        try:
            batch = json.loads(body)
            time_ms = int(batch["time_ms"])
            events = [event for event in batch["events"] if isinstance(event["id"], str)]
        except (ValueError, KeyError, TypeError):
            abort(400)
        fresh = 0
        db = database()
        with db:  # one transaction: the batch is stored whole or not at all (then retried)
            for event in events:
                fresh += record(db, event, time_ms)
        return jsonify(received=len(events), new=fresh)

    @app.get("/users/<user>")
    def user_status(user: str):
        row = database().execute("SELECT online, last_offline_ms FROM users WHERE user = ?",
                                 (user,)).fetchone()
        if row is None:
            return jsonify(user=user, online=None, last_offline_ms=None), 404
        return jsonify(user=user, online=bool(row["online"]),
                       last_offline_ms=row["last_offline_ms"])

    @app.get("/events")
    def events():
        rows = database().execute(
            "SELECT id, name, channel, user, time_ms, deliveries FROM events "
            "WHERE (:name IS NULL OR name = :name) AND (:user IS NULL OR user = :user) "
            "ORDER BY rowid", {"name": request.args.get("name"),
                               "user": request.args.get("user")}).fetchall()
        return jsonify(events=[dict(row) for row in rows])

    return app


def record(db: sqlite3.Connection, event: dict[str, Any], time_ms: int) -> bool:
    """Store ``event`` and act on it unless its ``id`` was seen before; whether it was new.

    A duplicate only has its delivery count raised: retries are expected, not errors.
    """
    db.execute(
        "INSERT INTO events (id, name, channel, user, time_ms) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET deliveries = deliveries + 1",
        (event["id"], str(event.get("name")), event.get("channel"), event.get("user"), time_ms))
    deliveries = db.execute("SELECT deliveries FROM events WHERE id = ?",
                            (event["id"],)).fetchone()[0]
    if deliveries > 1:
        return False
    user, name = event.get("user"), event.get("name")
    if name in ("user_online", "user_offline") and isinstance(user, str):
        online = int(name == "user_online")
        # time_ms is when a node sent the batch. Batches come in order from one sender at a
        # time, but a node that took the queue over may overlap a slow one: whatever was sent
        # later wins, so a late, older batch never undoes a newer state.
        db.execute(
            "INSERT INTO users (user, online, changed_ms, last_offline_ms) "
            "VALUES (:user, :online, :time, CASE WHEN :online THEN NULL ELSE :time END) "
            "ON CONFLICT (user) DO UPDATE SET online = :online, changed_ms = :time, "
            "last_offline_ms = CASE WHEN :online THEN last_offline_ms ELSE :time END "
            "WHERE changed_ms <= :time",
            {"user": user, "online": online, "time": time_ms})
    return True

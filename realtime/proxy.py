"""The backend proxy: the app behind realtime decides who connects, subscribes and publishes.

With ``--proxy-connect-url``, ``--proxy-subscribe-url`` or ``--proxy-publish-url`` (the last
two per namespace too: ``proxy_subscribe_url``/``proxy_publish_url`` in ``[namespaces.<name>]``)
the node POSTs the request's context as JSON to the app and follows its answer, so a Django or
Flask app keeps its own session auth (its cookie forwarded with ``--proxy-headers``) without
minting JWTs:

* connect ``{client, transport, peer, headers, auth}`` → ``{user, info?, channels?}``: the same
  :class:`~realtime.auth.Identity` a token would give.
* subscribe ``{client, user, channel, peer, headers}`` → ``{allow: true}``.
* publish ``{client, user, channel, data, peer, headers}`` → ``{allow: true}``, or ``{data}``:
  what is published instead.

Any of them may answer ``{error: {code, message}}`` (any 2xx or 4xx status): the client is
refused with that code when it is one of the error hierarchy's (:mod:`realtime.errors`),
``forbidden`` otherwise. A backend that does not answer within ``--proxy-timeout``, refuses the
connection, answers 5xx (or 1xx/3xx), or answers anything else than those shapes, is
:class:`~realtime.errors.Unavailable` (temporary): the client gets ``unavailable``, the log a
warning (at most one per kind every :data:`WARNING_INTERVAL` seconds), never a traceback.

Calls run in the session's handler greenlet (one event at a time per session, so a proxied
event keeps its place in the session's order of events and acks), through a pooled keep-alive
HTTP client (urllib3) that gevent's monkey patching makes cooperative: a slow backend holds up
the client that waits on it, and no other.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import gevent
import urllib3

from .auth import (
    MAX_GRANTS,
    MAX_INFO_BYTES,
    Authenticator,
    Identity,
    TokenAuthenticator,
    valid_user_id,
)
from .channels import namespace_of
from .config import Config
from .errors import (
    BadRequest,
    Forbidden,
    NotFound,
    RateLimited,
    RealtimeError,
    TooLarge,
    Unauthorized,
    Unavailable,
)

if TYPE_CHECKING:
    from .session import RequestContext, Session

logger = logging.getLogger(__name__)

# The codes a backend may refuse with; any other refuses as forbidden. ("internal" is the
# node's own failure: a backend that fails answers 5xx and the client gets unavailable.)
REFUSALS: Mapping[str, type[RealtimeError]] = {
    error.code: error for error in (BadRequest, Unauthorized, Forbidden, NotFound, TooLarge,
                                    RateLimited, Unavailable)}
MAX_MESSAGE_CHARS = 200
# An answer larger than this is garbage (a rewritten publication is limited far below it).
MAX_ANSWER_BYTES = 1024 * 1024
# Connections kept alive per backend host: concurrent calls beyond it open extra connections
# that are closed afterwards instead of being pooled.
POOL_SIZE = 32
WARNING_INTERVAL = 10.0

# (url, JSON body, timeout in seconds) -> (HTTP status, body); raises on a transport failure.
Poster = Callable[[str, bytes, float], tuple[int, bytes]]


class BackendFailure(Exception):
    """The backend did not give an answer to follow (timeout, refused, 5xx, garbage)."""


class HttpPoster:
    """POSTs JSON over urllib3's keep-alive connection pools.

    urllib3 (not a client of our own) because pooling, keep-alive with stale-connection
    detection, and timeouts are what it is made of; under gevent's monkey patching its sockets
    are cooperative. A ``gevent.Timeout`` bounds the whole call, which urllib3's per-operation
    timeouts do not (a backend dripping its answer a byte at a time).
    """

    def __init__(self, pool_size: int = POOL_SIZE) -> None:
        self.pool = urllib3.PoolManager(num_pools=8, maxsize=pool_size, block=False,
                                        retries=False)

    def __call__(self, url: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        with gevent.Timeout(timeout, BackendFailure(f"no answer within {timeout:g} s")):
            try:
                response = self.pool.request(
                    "POST", url, body=body, headers={"Content-Type": "application/json"},
                    timeout=urllib3.Timeout(connect=timeout, read=timeout), redirect=False,
                    preload_content=False)
            except urllib3.exceptions.NewConnectionError as exc:
                # (a subclass of ConnectTimeoutError, though mostly a refusal)
                raise BackendFailure(_describe(exc)) from None
            except urllib3.exceptions.TimeoutError:
                raise BackendFailure(f"no answer within {timeout:g} s") from None
            except urllib3.exceptions.HTTPError as exc:
                raise BackendFailure(_describe(exc)) from None
            try:
                data = response.read(MAX_ANSWER_BYTES + 1)
            except urllib3.exceptions.HTTPError as exc:
                raise BackendFailure(_describe(exc)) from None
            finally:
                response.release_conn()
        if len(data) > MAX_ANSWER_BYTES:
            raise BackendFailure(f"an answer over {MAX_ANSWER_BYTES} bytes")
        return response.status, data


def _describe(exc: Exception) -> str:
    """What went wrong, shortly: "connection refused" rather than urllib3's nested reprs."""
    reason = getattr(exc, "reason", None) or exc
    text = str(reason)
    return "connection refused" if "refused" in text.lower() else text[:200]


class BackendProxy:
    """The calls to the backend the configuration names; see the module docstring.

    Every call returns the backend's decision or raises a :class:`RealtimeError`: its refusal,
    or :class:`Unavailable` when it gave none.
    """

    def __init__(self, config: Config, poster: Poster | None = None) -> None:
        self.config = config
        self.connect_url = config.proxy_connect_url
        self.header_names = config.proxy_header_names
        self.timeout = config.proxy_timeout
        self.post = poster or HttpPoster()
        # Whether any backend decides subscribes or publishes (then sessions keep the listed
        # headers after connect, for those calls).
        self.decides_events = _names_event_backend(config)
        self._urls: dict[tuple[str, str], str] = {}
        self._warned: dict[str, float] = {}
        # Told (call, outcome, seconds) after every call: the node's metrics, when set.
        # outcome: "answered" (the backend decided for the client), "refused" (it refused),
        # "unavailable" (it gave no decision).
        self.on_call: Callable[[str, str, float], None] | None = None

    @classmethod
    def from_config(cls, config: Config) -> BackendProxy | None:
        """The proxy the configuration asks for; None when it names no backend at all."""
        return cls(config) if config.proxy_connect_url or _names_event_backend(config) else None

    def subscribe_url(self, channel: str) -> str:
        """The backend that decides subscribes to ``channel`` ("" when none does)."""
        return self._url("subscribe", channel)

    def publish_url(self, channel: str) -> str:
        """The backend that decides client publishes on ``channel`` ("" when none does)."""
        return self._url("publish", channel)

    def _url(self, kind: str, channel: str) -> str:
        namespace = namespace_of(channel)
        url = self._urls.get((kind, namespace))
        if url is None:
            override = getattr(self.config.namespace(namespace), f"proxy_{kind}_url")
            url = override if override is not None else getattr(self.config,
                                                                  f"proxy_{kind}_url")
            self._urls[kind, namespace] = url
        return url

    def headers_of(self, request: RequestContext) -> dict[str, str]:
        """The listed headers the request carries (lower-case names)."""
        headers = request.headers
        return {name: headers[name] for name in self.header_names if name in headers}

    def connect(self, request: RequestContext, auth: object, client_id: str) -> Identity:
        """Who the client connecting with ``auth`` over ``request`` is, as the backend says."""
        return self._counted("connect", lambda: _identity(self._call(
            "connect", self.connect_url, {
                "client": client_id, "transport": request.query.get("transport", ""),
                "peer": request.peer, "headers": self.headers_of(request), "auth": auth})))

    def subscribe(self, session: Session, channel: str) -> None:
        """Return when the backend allows ``session`` to subscribe to ``channel``."""
        def decide() -> None:
            answer = self._call("subscribe", self.subscribe_url(channel), {
                "client": session.client_id, "user": session.user, "channel": channel,
                "peer": session.request.peer, "headers": self.headers_of(session.request)})
            if answer.get("allow") is not True:
                _refuse_unless_allowed(answer)

        self._counted("subscribe", decide)

    def publish(self, session: Session, channel: str, data: Any) -> Any:
        """The data to publish on ``channel`` for ``session``: ``data``, or the backend's."""
        def decide() -> Any:
            answer = self._call("publish", self.publish_url(channel), {
                "client": session.client_id, "user": session.user, "channel": channel,
                "data": data, "peer": session.request.peer,
                "headers": self.headers_of(session.request)})
            if "data" in answer:
                return answer["data"]
            if answer.get("allow") is not True:
                _refuse_unless_allowed(answer)
            return data

        return self._counted("publish", decide)

    def _counted(self, kind: str, decide: Callable[[], Any]) -> Any:
        """``decide()``, told to :attr:`on_call` with its outcome and duration."""
        started = time.perf_counter()
        outcome = "unavailable"
        try:
            result = decide()
            outcome = "answered"
            return result
        except Unavailable:  # a RealtimeError too, but no decision: not a refusal
            raise
        except RealtimeError:
            outcome = "refused"
            raise
        finally:
            if self.on_call is not None:
                self.on_call(kind, outcome, time.perf_counter() - started)

    def _call(self, kind: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """The backend's answer object, its refusal raised, or Unavailable."""
        try:
            payload = json.dumps(body, separators=(",", ":")).encode()
            status, raw = self.post(url, payload, self.timeout)
            answer = _answer(status, raw)
        except BackendFailure as exc:
            self._warn(kind, url, str(exc))
            raise Unavailable(f"the {kind} backend is unavailable") from None
        except OSError as exc:  # a poster of sockets, without urllib3's wrapping
            self._warn(kind, url, exc.strerror or str(exc))
            raise Unavailable(f"the {kind} backend is unavailable") from None
        error = answer.get("error")
        if error is not None:
            raise _refusal(error)
        return answer

    def _warn(self, kind: str, url: str, what: str) -> None:
        """Log a failed call, at most once per kind every WARNING_INTERVAL seconds: a backend
        that is down must not flood the log with a line per client."""
        now = time.monotonic()
        if now - self._warned.get(kind, -WARNING_INTERVAL) >= WARNING_INTERVAL:
            self._warned[kind] = now
            logger.warning("%s backend %s failed: %s (clients get unavailable; further "
                           "failures in the next %g s are not logged)", kind, url, what,
                           WARNING_INTERVAL, extra={"code": "unavailable"})


def _names_event_backend(config: Config) -> bool:
    """Whether ``config`` names a subscribe or publish backend, node-wide or for a namespace."""
    return bool(config.proxy_subscribe_url or config.proxy_publish_url or any(
        namespace.proxy_subscribe_url or namespace.proxy_publish_url
        for namespace in config.namespaces.values()))


def _answer(status: int, raw: bytes) -> dict[str, Any]:
    """The answer object of a 2xx, or a 4xx that carries ``error``; else BackendFailure."""
    if not (200 <= status < 300 or 400 <= status < 500):
        raise BackendFailure(f"answered status {status}")
    try:
        answer = json.loads(raw)
    except ValueError:
        raise BackendFailure(f"answered status {status} with a body that is not JSON") from None
    if not isinstance(answer, dict):
        raise BackendFailure("answered JSON that is not an object")
    if status >= 400 and "error" not in answer:
        raise BackendFailure(f"answered status {status} without an error object")
    return answer


def _refusal(error: object) -> RealtimeError:
    """The error a backend's ``{error: {code, message}}`` refuses with."""
    if not isinstance(error, dict):
        return Forbidden()
    kind = REFUSALS.get(error.get("code"), Forbidden)  # type: ignore[arg-type]
    message = error.get("message")
    return kind(message[:MAX_MESSAGE_CHARS] if isinstance(message, str) and message else None)


def _refuse_unless_allowed(answer: dict[str, Any]) -> None:
    """``{allow: false}`` refuses; an answer of no known shape is the backend's failure."""
    if answer.get("allow") is False:
        raise Forbidden("the backend refused")
    raise Unavailable("the backend's answer has no allow, data or error")


def _identity(answer: dict[str, Any]) -> Identity:
    """The identity in a connect answer ``{user, info?, channels?}``; Unavailable when it is
    not one (a backend bug, not the client's fault)."""
    user, info, grants = answer.get("user"), answer.get("info"), answer.get("channels", [])
    problem = None
    if not valid_user_id(user):
        problem = "user must be a user id of 1 to 64 characters"
    elif info is not None and (not isinstance(info, dict) or len(
            json.dumps(info, separators=(",", ":"))) > MAX_INFO_BYTES):
        problem = f"info must be an object of at most {MAX_INFO_BYTES} bytes"
    elif not isinstance(grants, list) or len(grants) > MAX_GRANTS or not all(
            isinstance(grant, str) and grant for grant in grants):
        problem = "channels must be a list of channel names or prefix* patterns"
    if problem is not None:
        logger.warning("connect backend answered a bad identity: %s", problem)
        raise Unavailable("the connect backend's answer is not an identity")
    # The backend vouches for the user as a token would: "authenticated" rules admit it.
    return Identity(user, authenticated=True, info=info, grants=tuple(grants))


class ProxyAuthenticator:
    """The connect hook with ``--proxy-connect-url``: the backend decides who clients are.

    With a JWT key configured too, a client that sends ``auth.token`` is verified locally (no
    backend call) and can ``refresh`` it; every other client is who the backend says.
    """

    def __init__(self, proxy: BackendProxy, tokens: TokenAuthenticator | None = None) -> None:
        self.proxy = proxy
        self.tokens = tokens

    def authenticate(self, request: Any, auth: object, client_id: str) -> Identity:
        if self.tokens is not None and isinstance(auth, dict) and auth.get("token") is not None:
            return self.tokens.authenticate(request, auth, client_id)
        return self.proxy.connect(request, auth, client_id)

    def refresh(self, identity: Identity, token: object) -> Identity:
        if self.tokens is None:
            raise BadRequest("this node's backend decides who clients are: there is no token "
                             "to refresh")
        return self.tokens.refresh(identity, token)


def create_proxy_authenticator(config: Config, proxy: BackendProxy) -> Authenticator:
    """The connect hook for a node with ``proxy_connect_url``."""
    return ProxyAuthenticator(proxy, TokenAuthenticator(config) if config.jwt_configured
                              else None)

"""Who a client is: the connect hook, and the connection tokens (JWT) it verifies.

Every session, whatever its transport, connects through one :class:`Authenticator`
(``ClientProtocol.connect`` calls it once). Two ship with realtime, chosen by configuration:

* :class:`AnonymousAuthenticator` when no JWT key is configured (development): every client is
  anonymous and is who ``auth.user`` says, unverified.
* :class:`TokenAuthenticator` when one is: the client sends ``auth: {token}``, a JWT with a
  required ``exp``, whose ``sub`` is the user id; optional claims ``info`` (an object, shown in
  presence) and ``channels`` (names or ``prefix*`` patterns granted beyond the public ones).
  Without a token a client is refused, or with ``allow_anonymous`` connects as ``anon-<sid>``.

A third, :class:`realtime.proxy.ProxyAuthenticator`, asks the app's backend instead when
``proxy_connect_url`` is configured.

A refused connect raises :class:`~realtime.errors.Unauthorized` (bad, expired or missing token)
or :class:`~realtime.errors.Unavailable` (the JWKS endpoint cannot be reached); the session
answers ``connect_error`` ``{message: <code>, data: {reason}}``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .config import Config
from .errors import BadRequest, Unauthorized, Unavailable

logger = logging.getLogger(__name__)

MAX_USER_ID_LENGTH = 64
# A token's `info` claim is repeated in every presence answer: keep it small.
MAX_INFO_BYTES = 2048
MAX_GRANTS = 256
# How long a fetched JWKS is trusted, and how often an unknown `kid` may trigger a refetch
# (every token with a made-up kid would otherwise cost a request to the identity provider).
JWKS_LIFESPAN = 300.0
JWKS_REFRESH_COOLDOWN = 30.0
JWKS_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """Who a client is, as the connect hook decided.

    ``authenticated``: the client proved it with a valid token. ``expires_at``: when that proof
    expires (the session is closed then unless the client sends a fresh token). ``grants``: the
    channels (names, or ``prefix*`` patterns) the token grants beyond the public ones.
    """

    user: str
    authenticated: bool = False
    expires_at: float | None = None
    info: Mapping[str, Any] | None = None
    grants: tuple[str, ...] = ()

    def grants_channel(self, channel: str) -> bool:
        """True when the token's ``channels`` claim names ``channel`` (or a prefix of it)."""
        for grant in self.grants:
            if grant.endswith("*"):
                if channel.startswith(grant[:-1]):
                    return True
            elif grant == channel:
                return True
        return False


class Authenticator(Protocol):
    """The connect hook: who is the client connecting with ``auth`` over ``request``?

    ``request`` is the session's :class:`~realtime.session.RequestContext` (peer address,
    origin, headers, query). Returns the client's :class:`Identity` or raises a
    :class:`~realtime.errors.RealtimeError`. Called once per session, for every transport,
    before the session joins the node; may block on I/O (a JWKS fetch) in the session's
    greenlet.
    """

    def authenticate(self, request: Any, auth: object, client_id: str) -> Identity: ...

    def refresh(self, identity: Identity, token: object) -> Identity:
        """A fresh identity for the same user from a new token (``refresh`` event)."""
        ...


def valid_user_id(user: object) -> bool:
    """A non-empty string of at most 64 characters that is valid Unicode (UTF-8-encodable).

    A lone surrogate (valid in JSON text, not in UTF-8) could never be written to a msgpack
    client, nor to Redis as text.
    """
    if not isinstance(user, str) or not 0 < len(user) <= MAX_USER_ID_LENGTH:
        return False
    try:
        user.encode()
    except UnicodeEncodeError:
        return False
    return True


def user_id_from_auth(auth: object, client_id: str) -> str:
    """Development mode's user id: ``auth.user`` when usable, else ``anon-<sid>``."""
    if isinstance(auth, dict) and valid_user_id(auth.get("user")):
        return auth["user"]
    return "anon-" + client_id


class AnonymousAuthenticator:
    """Development default (no JWT key configured): everyone is welcome, and is who
    ``auth.user`` says. Nothing is verified: do not expose such a node to the internet."""

    def authenticate(self, request: Any, auth: object, client_id: str) -> Identity:
        return Identity(user_id_from_auth(auth, client_id))

    def refresh(self, identity: Identity, token: object) -> Identity:
        raise BadRequest("this node has no tokens to refresh (no JWT key is configured)")


class TokenVerifier:
    """Verifies connection tokens with the configured key: their claims, or Unauthorized.

    HS256 with ``jwt_secret`` (then ``jwt_previous_secret``, during a rotation), the algorithm
    that fits ``jwt_public_key`` (RS256 for RSA, ES256/ES384/ES512 for EC by curve, EdDSA for
    Ed25519/Ed448), or the keys of ``jwt_jwks_url`` (their ``alg``). ``exp`` and ``sub`` are
    required; ``aud`` and ``iss`` when configured.
    """

    def __init__(self, config: Config) -> None:
        self.audience = config.jwt_audience or None
        self.issuer = config.jwt_issuer or None
        self._keys: list[tuple[Any, list[str]]] = []
        self._jwks: jwt.PyJWKClient | None = None
        if config.jwt_secret:
            self._keys = [(secret, ["HS256"]) for secret in
                          (config.jwt_secret, config.jwt_previous_secret) if secret]
        elif config.jwt_public_key:
            self._keys = [_public_key(config.jwt_public_key)]
        elif config.jwt_jwks_url:
            self._jwks = jwt.PyJWKClient(config.jwt_jwks_url, cache_keys=True,
                                         lifespan=JWKS_LIFESPAN, timeout=JWKS_TIMEOUT,
                                         cooldown_duration=JWKS_REFRESH_COOLDOWN)
        else:
            raise ValueError("TokenVerifier needs a JWT key in the configuration")

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; Unauthorized with the reason, or Unavailable (JWKS down)."""
        options: dict[str, Any] = {"require": ["exp", "sub"]}
        keys = self._keys
        if self._jwks is not None:
            try:
                signing = self._jwks.get_signing_key_from_jwt(token)
            except jwt.PyJWKClientConnectionError as exc:
                logger.warning("cannot fetch the JWKS: %s", exc)
                raise Unavailable("the keys to verify tokens cannot be fetched") from None
            except (jwt.PyJWKClientError, jwt.DecodeError) as exc:
                raise Unauthorized(_reason(exc)) from None
            keys = [(signing, [signing.algorithm_name])]
        last: jwt.PyJWTError | None = None
        for key, algorithms in keys:
            try:
                return jwt.decode(token, key, algorithms=algorithms, audience=self.audience,
                                  issuer=self.issuer, options=options)
            except jwt.InvalidSignatureError as exc:
                last = exc  # maybe signed with the previous secret: try it
            except jwt.PyJWTError as exc:
                raise Unauthorized(_reason(exc)) from None
        raise Unauthorized(_reason(last))


def _reason(exc: Exception | None) -> str:
    """A short, stable reason for connect_error (the official client shows it)."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad token signature"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token for another audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "token from another issuer"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token without {exc.claim}"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not valid yet"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "token signed with another algorithm"
    if isinstance(exc, jwt.PyJWKClientError):
        return "token signed with an unknown key"
    return "malformed token"


def _public_key(path: str) -> tuple[Any, list[str]]:
    """The PEM public key in ``path`` and the algorithms it verifies."""
    key = load_pem_public_key(Path(path).read_bytes())
    if isinstance(key, rsa.RSAPublicKey):
        return key, ["RS256", "RS384", "RS512"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        algorithm = by_curve.get(key.curve.name)
        if algorithm is None:
            raise ValueError(f"unsupported EC curve {key.curve.name}")
        return key, [algorithm]
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return key, ["EdDSA"]
    raise ValueError(f"unsupported public key type {type(key).__name__}")


class TokenAuthenticator:
    """The connect hook with a JWT key configured (see the module docstring)."""

    def __init__(self, config: Config, verifier: TokenVerifier | None = None) -> None:
        self.verifier = verifier or TokenVerifier(config)
        self.allow_anonymous = config.allow_anonymous

    def authenticate(self, request: Any, auth: object, client_id: str) -> Identity:
        token = auth.get("token") if isinstance(auth, dict) else None
        if token is None:
            if self.allow_anonymous:
                return Identity("anon-" + client_id)
            raise Unauthorized("token required")
        return self._identity(token)

    def refresh(self, identity: Identity, token: object) -> Identity:
        fresh = self._identity(token)
        if fresh.user != identity.user:
            raise Unauthorized("the new token is for another user")
        return fresh

    def _identity(self, token: object) -> Identity:
        if not isinstance(token, str) or not token:
            raise Unauthorized("token must be a string")
        claims = self.verifier.verify(token)
        user = claims.get("sub")
        if not valid_user_id(user):
            raise Unauthorized("token sub must be a user id of 1 to 64 characters")
        info = claims.get("info")
        if info is not None:
            if not isinstance(info, dict):
                raise Unauthorized("token info must be an object")
            if len(json.dumps(info, separators=(",", ":"))) > MAX_INFO_BYTES:
                raise Unauthorized(f"token info is over {MAX_INFO_BYTES} bytes")
        grants = claims.get("channels", [])
        if not isinstance(grants, list) or len(grants) > MAX_GRANTS or not all(
                isinstance(grant, str) and grant for grant in grants):
            raise Unauthorized("token channels must be a list of channel names or prefix* "
                               "patterns")
        exp = claims["exp"]
        return Identity(user, authenticated=True, expires_at=float(exp), info=info,
                        grants=tuple(grants))


def create_authenticator(config: Config) -> Authenticator:
    """The connect hook the configuration asks for."""
    if config.jwt_configured:
        return TokenAuthenticator(config)
    return AnonymousAuthenticator()


def remaining(identity: Identity, now: float | None = None) -> float | None:
    """Seconds until ``identity``'s token expires (None: it does not)."""
    if identity.expires_at is None:
        return None
    return identity.expires_at - (time.time() if now is None else now)


__all__: Sequence[str] = ["AnonymousAuthenticator", "Authenticator", "Identity",
                          "TokenAuthenticator", "TokenVerifier", "create_authenticator",
                          "user_id_from_auth", "valid_user_id"]

"""Connection tokens: verification with every kind of key, identities, refresh."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from realtime.auth import (
    AnonymousAuthenticator,
    Identity,
    TokenAuthenticator,
    TokenVerifier,
    create_authenticator,
)
from realtime.config import Config
from realtime.errors import BadRequest, Unauthorized, Unavailable

SECRET = "s3cret-for-tests-" + "x" * 16  # HS256 keys are at least 32 bytes


def token(key=SECRET, algorithm="HS256", headers=None, **claims):
    claims.setdefault("sub", "alice")
    # Long-lived: parametrized tokens are made when the module is collected, and a full suite
    # runs minutes after that.
    claims.setdefault("exp", int(time.time()) + 3600)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key,
                      algorithm=algorithm, headers=headers)


def authenticator(**settings) -> TokenAuthenticator:
    return TokenAuthenticator(Config(jwt_secret=SECRET, **settings))


def refusal(auth, **kwargs) -> str:
    with pytest.raises(Unauthorized) as raised:
        auth.authenticate(None, kwargs, "sid1")
    return raised.value.message


def test_a_valid_token_names_the_user_its_grants_info_and_expiry():
    exp = int(time.time()) + 60
    identity = authenticator().authenticate(None, {"token": token(
        exp=exp, info={"name": "Alice"}, channels=["private:team", "news:*"])}, "sid1")
    assert identity == Identity("alice", authenticated=True, expires_at=float(exp),
                                info={"name": "Alice"}, grants=("private:team", "news:*"))
    assert identity.grants_channel("private:team") and identity.grants_channel("news:sport")
    assert not identity.grants_channel("private:other") and not identity.grants_channel("new")


@pytest.mark.parametrize("auth,reason", [
    ({}, "token required"),
    ({"token": 42}, "token must be a string"),
    ({"token": "not.a.jwt"}, "malformed token"),
    ({"token": token(exp=int(time.time()) - 5)}, "token expired"),
    ({"token": token(key="another-secret-" + "y" * 20)}, "bad token signature"),
    ({"token": token(exp=None)}, "token without exp"),
    ({"token": token(sub=None)}, "token without sub"),
    ({"token": token(sub="x" * 65)}, "sub must be a user id"),
    ({"token": token(info="not an object")}, "info must be an object"),
    ({"token": token(info={"x": "y" * 3000})}, "info is over"),
    ({"token": token(channels="private:*")}, "channels must be a list"),
    ({"token": token(nbf=int(time.time()) + 3000)}, "not valid yet"),
])
def test_bad_missing_or_expired_tokens_are_refused_with_a_reason(auth, reason):
    assert reason in refusal(authenticator(), **auth)


def test_audience_and_issuer_are_checked_when_configured():
    auth = authenticator(jwt_audience="realtime", jwt_issuer="https://id.example")
    good = token(aud="realtime", iss="https://id.example")
    assert auth.authenticate(None, {"token": good}, "s").user == "alice"
    assert "another audience" in refusal(auth, token=token(aud="other",
                                                           iss="https://id.example"))
    assert "another issuer" in refusal(auth, token=token(aud="realtime", iss="https://evil"))
    assert "without aud" in refusal(auth, token=token(iss="https://id.example"))


def test_the_previous_secret_is_accepted_during_a_rotation():
    new, old, older = ("n" * 32, "o" * 32, "p" * 32)
    auth = TokenAuthenticator(Config(jwt_secret=new, jwt_previous_secret=old))
    assert auth.authenticate(None, {"token": token(key=old)}, "s").user == "alice"
    assert auth.authenticate(None, {"token": token(key=new)}, "s").user == "alice"
    assert "bad token signature" in refusal(auth, token=token(key=older))


def test_an_hs256_node_refuses_tokens_that_claim_another_algorithm():
    # "alg": "none" and friends must never pass.
    unsigned = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None,
                          algorithm="none")
    assert "another algorithm" in refusal(authenticator(), token=unsigned)


def test_anonymous_connections_when_allowed_are_anon_sid_whatever_auth_user_says():
    strict = authenticator()
    assert "token required" in refusal(strict, user="alice")
    lenient = authenticator(allow_anonymous=True)
    identity = lenient.authenticate(None, {"user": "alice"}, "sid9")
    assert identity == Identity("anon-sid9") and not identity.authenticated


def pem_file(tmp_path, private_key, name):
    path = tmp_path / name
    path.write_bytes(private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(path)


KEY_KINDS = {
    "RS256": lambda: rsa.generate_private_key(65537, 2048),
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate,
}


@pytest.mark.parametrize("algorithm", list(KEY_KINDS))
def test_public_keys_of_every_kind_verify_their_tokens(tmp_path, algorithm):
    private_key = KEY_KINDS[algorithm]()
    path = pem_file(tmp_path, private_key, "k.pem")
    auth = TokenAuthenticator(Config(jwt_public_key=path))
    assert auth.authenticate(None, {"token": token(key=private_key, algorithm=algorithm)},
                             "s").user == "alice"
    other = KEY_KINDS[algorithm]()
    assert "bad token signature" in refusal(auth, token=token(key=other, algorithm=algorithm))
    # The classic confusion attack: HS256 "signed" with the public key as its secret.
    forged = _hs256_by_hand({"sub": "mallory", "exp": int(time.time()) + 60},
                            Path(path).read_bytes())
    assert "another algorithm" in refusal(auth, token=forged)


def _hs256_by_hand(claims: dict, secret: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


class JwksServer:
    """A JWKS endpoint on loopback whose keys the test changes; counts its fetches."""

    def __init__(self) -> None:
        self.keys: list[dict] = []
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.fetches += 1
                body = json.dumps({"keys": server.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, private_key, kid: str) -> None:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
        self.keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks():
    server = JwksServer()
    yield server
    server.close()


def test_jwks_keys_are_cached_and_refetched_for_an_unknown_kid(jwks):
    first, second = (rsa.generate_private_key(65537, 2048) for _ in range(2))
    jwks.publish(first, "k1")
    auth = TokenAuthenticator(Config(jwt_jwks_url=jwks.url))
    auth.verifier._jwks.cooldown_duration = 0  # the test rotates keys at once
    signed = token(key=first, algorithm="RS256", headers={"kid": "k1"})
    assert auth.authenticate(None, {"token": signed}, "s").user == "alice"
    assert auth.authenticate(None, {"token": signed}, "s").user == "alice"
    assert jwks.fetches == 1  # cached
    jwks.publish(second, "k2")  # the provider rotates: a token with the new kid arrives
    rotated = token(key=second, algorithm="RS256", headers={"kid": "k2"})
    assert auth.authenticate(None, {"token": rotated}, "s").user == "alice"
    assert jwks.fetches == 2
    unknown = token(key=second, algorithm="RS256", headers={"kid": "k3"})
    assert "unknown key" in refusal(auth, token=unknown)


def test_an_unknown_kid_refetches_the_jwks_at_most_once_per_cooldown(jwks):
    key = rsa.generate_private_key(65537, 2048)
    jwks.publish(key, "k1")
    auth = TokenAuthenticator(Config(jwt_jwks_url=jwks.url))
    auth.authenticate(None, {"token": token(key=key, algorithm="RS256",
                                            headers={"kid": "k1"})}, "s")
    for i in range(5):  # made-up kids must not make the node hammer the identity provider
        refusal(auth, token=token(key=key, algorithm="RS256", headers={"kid": f"bogus{i}"}))
    assert jwks.fetches == 1


def test_an_unreachable_jwks_is_unavailable_not_unauthorized():
    auth = TokenAuthenticator(Config(jwt_jwks_url="http://127.0.0.1:9/jwks"))
    key = rsa.generate_private_key(65537, 2048)
    with pytest.raises(Unavailable):
        auth.authenticate(None, {"token": token(key=key, algorithm="RS256",
                                                headers={"kid": "k1"})}, "s")


def test_refresh_takes_a_new_token_of_the_same_user_only():
    auth = authenticator()
    identity = auth.authenticate(None, {"token": token(exp=int(time.time()) + 10)}, "s")
    later = int(time.time()) + 3600
    refreshed = auth.refresh(identity, token(exp=later))
    assert refreshed.expires_at == later
    with pytest.raises(Unauthorized, match="another user"):
        auth.refresh(identity, token(sub="mallory"))
    with pytest.raises(Unauthorized, match="expired"):
        auth.refresh(identity, token(exp=int(time.time()) - 1))


def test_without_a_key_connections_are_anonymous_and_cannot_refresh():
    auth = create_authenticator(Config())
    assert isinstance(auth, AnonymousAuthenticator)
    assert auth.authenticate(None, {"user": "alice"}, "s") == Identity("alice")
    assert auth.authenticate(None, {"user": "\ud800"}, "s").user == "anon-s"
    with pytest.raises(BadRequest):
        auth.refresh(Identity("alice"), "whatever")
    assert isinstance(create_authenticator(Config(jwt_secret=SECRET)), TokenAuthenticator)


def test_a_verifier_needs_a_key():
    with pytest.raises(ValueError):
        TokenVerifier(Config())

"""Passwords, signing keys, tokens and API key secrets: the cryptography, nothing else."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from strata.common.auth import ALGORITHM, API_KEY_PREFIX

_hasher = PasswordHash((Argon2Hasher(),))
# Verified when the email is unknown, so a wrong email costs as long as a wrong password (no user enumeration).
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password: str, password_hash: str | None) -> tuple[bool, str | None]:
    """(valid, a new hash when the stored one uses outdated parameters). Constant time (argon2); with ``None`` it
    still spends the time of a real check, so an unknown email answers as slowly as a wrong password."""
    if password_hash is None:
        _hasher.verify(password, _DUMMY_HASH)
        return False, None
    try:
        valid, updated = _hasher.verify_and_update(password, password_hash)
    except ValueError:  # an unreadable hash: refuse, never crash the login
        return False, None
    return bool(valid), updated


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


# -- signing keys ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeneratedKey:
    kid: str
    private_pem: str
    public_jwk: dict[str, Any]


def generate_signing_key(secret: str | None) -> GeneratedKey:
    private = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(secret.encode()) if secret else serialization.NoEncryption()
    )
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption).decode()
    jwk: dict[str, Any] = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    # RFC 7638 thumbprint as the kid: stable, and says nothing but which key it is.
    thumbprint = json.dumps(
        {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]}, separators=(",", ":"), sort_keys=True
    )
    kid = jwt.utils.base64url_encode(hashlib.sha256(thumbprint.encode()).digest()).decode()
    jwk.update(kid=kid, alg=ALGORITHM, use="sig")
    return GeneratedKey(kid=kid, private_pem=pem, public_jwk=jwk)


def load_private_key(pem: str, secret: str | None) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=secret.encode() if secret else None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("signing key is not Ed25519")
    return key


def mint_access_token(
    *,
    key: Ed25519PrivateKey,
    kid: str,
    issuer: str,
    audience: str,
    user_id: str,
    role: str,
    session_id: str,
    now: datetime,
    ttl: timedelta,
) -> tuple[str, str, datetime]:
    """(token, jti, expires_at)."""
    jti = uuid.uuid4().hex
    expires = now + ttl
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": user_id,
        "role": role,
        "sid": session_id,
        "jti": jti,
        "iat": int(now.timestamp()),
        "nbf": int(now.timestamp()),
        "exp": int(expires.timestamp()),
    }
    token = jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": kid, "typ": "JWT"})
    return token, jti, expires


# -- opaque secrets --------------------------------------------------------------------------------------------------
def new_refresh_token() -> str:
    return secrets.token_urlsafe(32)


def new_api_key() -> tuple[str, str]:
    """(key id, full key). The key reads ``strata_<id>_<secret>``: the id finds it, only the hash of all is stored."""
    key_id = secrets.token_hex(8)
    return key_id, f"{API_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"

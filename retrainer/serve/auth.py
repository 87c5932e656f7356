"""API-key checks, and the rule that only a loopback service may run without a key."""
from __future__ import annotations

import hmac
import ipaddress

#: Environment variable read for the key when ``--api-key`` is not given.
API_KEY_ENV = "RETRAINER_API_KEY"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def key_matches(expected: str, authorization: str | None, x_api_key: str | None) -> bool:
    """``Authorization: Bearer KEY`` or ``X-API-Key: KEY``, compared in constant time."""
    given = x_api_key
    if given is None and authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
    if given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())

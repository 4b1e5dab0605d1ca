"""API keys (``Authorization: Bearer <key>``), from a file and/or the environment, failing closed.

    DALLE2_API_KEYS=key1,key2          environment (the RayService sets it from a Kubernetes Secret)
    api_keys_file: /etc/dalle2/keys    one key per line, ``#`` starts a comment

Failing closed: a key source that is configured but yields no key (an empty file, one of comments
only, ``DALLE2_API_KEYS=""``) refuses to start rather than serving an open API; and no key at all
is only allowed on a loopback address (a laptop) or with ``allow_unauthenticated: true``
(``dalle2 serve --insecure-no-auth``). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from typing import Mapping, Optional

API_KEYS_ENV = "DALLE2_API_KEYS"
ADMIN_KEYS_ENV = "DALLE2_ADMIN_KEYS"  # the admin route's keys (none: the route refuses everyone)


class KeyConfigError(ValueError):
    """The key setup would expose an open API where one was not asked for: refuse to start."""


def load_api_keys(keys_file: Optional[str] = None, environ: Mapping[str, str] = os.environ, env_name: str = API_KEYS_ENV) -> frozenset[str]:
    """Every configured key. Raises :class:`KeyConfigError` when a configured source is empty."""
    keys: set[str] = set()
    if env_name in environ:
        from_env = {key.strip() for key in environ[env_name].split(",")} - {""}
        if not from_env:
            raise KeyConfigError(f"${env_name} is set but holds no key: refusing to serve an open API")
        keys |= from_env
    if keys_file:
        with open(keys_file, encoding="utf-8") as lines:
            from_file = {line.split("#", 1)[0].strip() for line in lines} - {""}
        if not from_file:
            raise KeyConfigError(f"{keys_file} holds no key (empty or comments only): refusing to serve an open API")
        keys |= from_file
    return frozenset(keys)


def is_loopback(host: Optional[str]) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False  # 0.0.0.0, a public address, a host name, or unknown (None)


def require_keys_or_consent(keys: frozenset[str], host: Optional[str], allow_unauthenticated: bool) -> None:
    """No keys on a non-loopback address is an open API on the network: only when asked for."""
    if keys or allow_unauthenticated or is_loopback(host):
        return
    raise KeyConfigError(
        f"the API would be open to anyone who can reach {host or 'this address'}: configure keys "
        f"(api_keys_file or ${API_KEYS_ENV}) or set allow_unauthenticated: true (dalle2 serve --insecure-no-auth)"
    )


def is_authorized(authorization: Optional[str], keys: frozenset[str]) -> bool:
    """True when no keys are configured (allowed by :func:`require_keys_or_consent`), or the header
    carries one of them as a Bearer token."""
    return not keys or bearer_key(authorization, keys) is not None


def bearer_key(authorization: Optional[str], keys: frozenset[str]) -> Optional[str]:
    """The configured key the header carries, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    raw = token.strip().encode()
    found = None
    # Compare against every key (no early exit) so timing does not tell which prefix matched.
    for key in keys:
        if hmac.compare_digest(raw, key.encode()):
            found = key
    return found

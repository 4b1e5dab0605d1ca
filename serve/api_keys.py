"""Optional API keys (``Authorization: Bearer <key>``), from a file and/or the environment.

    DALLE2_API_KEYS=key1,key2          environment (set it in the serve config's runtime_env)
    api_keys_file: /etc/dalle2/keys    one key per line, ``#`` starts a comment

No key configured = the API is open (a laptop). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import os
from typing import Mapping, Optional

API_KEYS_ENV = "DALLE2_API_KEYS"


def load_api_keys(keys_file: Optional[str] = None, environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    keys = {key.strip() for key in environ.get(API_KEYS_ENV, "").split(",")}
    if keys_file:
        with open(keys_file, encoding="utf-8") as lines:
            keys |= {line.split("#", 1)[0].strip() for line in lines}
    return frozenset(key for key in keys if key)


def is_authorized(authorization: Optional[str], keys: frozenset[str]) -> bool:
    """True when no keys are configured, or the header carries one of them as a Bearer token."""
    if not keys:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    token = token.strip().encode()
    # Compare against every key (no early exit) so timing does not tell which prefix matched.
    matches = [hmac.compare_digest(token, key.encode()) for key in keys]
    return any(matches)

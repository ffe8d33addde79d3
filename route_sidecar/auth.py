"""Bearer tokens, for both listeners: read from the request, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence


def bearer_token(headers: Mapping[str, str]) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
    Header bytes that are not UTF-8 stay bytes: a wrong token, never an error."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode("utf-8", "surrogateescape")


def token_matches(given: bytes, tokens: Sequence[bytes]) -> bool:
    """Compared with every token, always, so the time taken says nothing."""
    matches = [hmac.compare_digest(given, token) for token in tokens]
    return any(matches)

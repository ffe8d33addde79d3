"""Bearer tokens as both listeners read them."""

from __future__ import annotations

from route_sidecar.auth import bearer_token, token_matches


def test_the_bearer_scheme_is_case_insensitive_and_the_token_exact() -> None:
    assert bearer_token({"Authorization": "Bearer abc"}) == b"abc"
    assert bearer_token({"Authorization": "bearer abc"}) == b"abc"
    assert bearer_token({"Authorization": "Basic abc"}) is None
    assert bearer_token({"Authorization": "Bearer "}) is None
    assert bearer_token({}) is None


def test_header_bytes_that_are_not_utf8_are_a_wrong_token_not_an_error() -> None:
    given = bearer_token({"Authorization": "Bearer \udcff\udcfe"})
    assert given is not None
    assert not token_matches(given, [b"the-real-token"])


def test_a_token_matches_only_one_of_the_configured_tokens_exactly() -> None:
    tokens = [b"first-token-aaaaaaaa", b"second-token-bbbbbbb"]
    assert token_matches(b"second-token-bbbbbbb", tokens)
    assert not token_matches(b"second-token-bbbbbb", tokens)
    assert not token_matches(b"SECOND-TOKEN-BBBBBBB", tokens)
    assert not token_matches(b"", tokens)

"""route_sidecar/crypto.py's pure helpers (the encrypted paths themselves run against Synapse in
tests/e2e/test_encryption.py)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip(
    "olm", reason="route_sidecar/crypto.py needs python-olm (route-sidecar[encryption])"
)

from mautrix.types import DeviceID, UserID

from route_sidecar.crypto import own_otk_counts

BOT = UserID("@route:localhost")
DEVICE = DeviceID("EWRGy-H4upmYsA")


def test_only_the_bots_own_device_count_is_handed_to_mautrix() -> None:
    # As Synapse 1.163 sends it: the cross-signing keys are listed as devices too.
    counts = {
        BOT: {
            DEVICE: {"signed_curve25519": 42},
            "nlQIz26+0NKeDIeJ99IUCVS+Vic2e9aEN86d+JuZPd4": {"signed_curve25519": 0},
            "/UDyhpPiL59BD86FbXViBboR+P8vyao+R7tPhcHuVE0": {"signed_curve25519": 0},
        },
        "@someone:localhost": {"OTHER": {"signed_curve25519": 1}},
    }
    own = own_otk_counts(counts, BOT, DEVICE)
    assert list(own) == [BOT] and list(own[BOT]) == [DEVICE]
    assert own[BOT][DEVICE].signed_curve25519 == 42


@pytest.mark.parametrize(
    "counts",
    [{}, {BOT: {}}, {BOT: "not a map"}, {BOT: {DEVICE: 5}}, {"@someone:localhost": {DEVICE: {}}}],
)
def test_no_count_for_the_bots_device_hands_nothing(counts: dict[str, Any]) -> None:
    assert own_otk_counts(counts, BOT, DEVICE) == {}

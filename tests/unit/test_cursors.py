"""Opaque page cursors: they round-trip, hide the position, and only their issuer reads them."""

from __future__ import annotations

import pytest

from gpufleet.api.cursors import BadCursor, CursorCodec


def test_round_trip_across_replicas_sharing_the_secret() -> None:
    one, other = CursorCodec(b"k" * 32), CursorCodec(b"k" * 32)
    for position in (0, 1, 41, 2**40 + 7, 2**64 - 1):
        assert other.decode(one.encode(position)) == position


def test_the_position_is_not_readable_and_never_repeats() -> None:
    codec = CursorCodec(b"k" * 32)
    tokens = {codec.encode(1234) for _ in range(50)}
    assert len(tokens) == 50
    assert all("1234" not in t and not t.isdigit() for t in tokens)


def test_another_deployments_cursor_is_refused() -> None:
    token = CursorCodec(b"a" * 32).encode(5)
    with pytest.raises(BadCursor, match="not issued"):
        CursorCodec(b"b" * 32).decode(token)


@pytest.mark.parametrize("bad", ["", "5", "%%%", "A" * 65, "AAAA" * 12])
def test_garbage_is_refused(bad: str) -> None:
    with pytest.raises(BadCursor):
        CursorCodec(b"k" * 32).decode(bad)

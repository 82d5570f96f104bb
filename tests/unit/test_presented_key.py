"""Which API key a request presents (read from the ASGI scope's raw headers)."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from gpufleet.api.auth import presented_key


def _request(*headers: tuple[bytes, bytes]) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/api/chat", "headers": list(headers)}
    return Request(scope)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"authorization", b"Bearer gpf_abc")], "gpf_abc"),
        ([(b"authorization", b"bearer   gpf_abc  ")], "gpf_abc"),  # scheme in any case
        ([(b"x-api-key", b"gpf_xyz")], "gpf_xyz"),
        # a Bearer with nothing after it does not hide X-API-Key
        ([(b"authorization", b"Bearer "), (b"x-api-key", b"gpf_xyz")], "gpf_xyz"),
        # another scheme is not a key
        ([(b"authorization", b"Basic dXNlcjpwYXNz")], None),
        # Bearer wins over X-API-Key, whatever the order
        ([(b"x-api-key", b"gpf_xyz"), (b"authorization", b"Bearer gpf_abc")], "gpf_abc"),
        # the first of a repeated header counts (as Starlette's Headers.get)
        ([(b"authorization", b"Bearer one"), (b"authorization", b"Bearer two")], "one"),
        ([(b"content-type", b"application/json")], None),
        ([(b"x-api-key", b"")], None),
    ],
)
def test_presented_key(headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert presented_key(_request(*headers)) == expected

"""Opaque page cursors: the queue's position, encrypted and signed.

The task index is ordered by a global enqueue counter, so the raw position would tell
any key how many tasks *everyone* submitted between two of its own pages. A cursor is
``base64url(nonce | position XOR keystream | tag)``: the keystream is
HMAC-SHA256(key, "enc" | nonce) and the tag HMAC-SHA256(key, "mac" | nonce | ciphertext)
(a PRF in counter mode, then MAC: only the holder of the key can read or forge one).
The key is derived from the deployment's auth secret, so every replica reads every
replica's cursors. Standard library only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

_NONCE = 12
_BODY = 8  # the position, unsigned 64-bit big-endian
_TAG = 16
_LENGTH = _NONCE + _BODY + _TAG


class BadCursor(ValueError):
    """The cursor was not made by this deployment (or was altered)."""


class CursorCodec:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("cursor key too short")
        self._key = key

    @classmethod
    def random(cls) -> CursorCodec:
        """A codec with a throw-away key (cursors do not survive this process)."""
        return cls(secrets.token_bytes(32))

    def _stream(self, nonce: bytes) -> bytes:
        return hmac.new(self._key, b"enc" + nonce, hashlib.sha256).digest()[:_BODY]

    def _tag(self, nonce: bytes, body: bytes) -> bytes:
        return hmac.new(self._key, b"mac" + nonce + body, hashlib.sha256).digest()[:_TAG]

    def encode(self, position: int) -> str:
        if not 0 <= position < 2**64:
            raise ValueError(f"position out of range: {position}")
        nonce = secrets.token_bytes(_NONCE)
        plain = position.to_bytes(_BODY, "big")
        body = bytes(a ^ b for a, b in zip(plain, self._stream(nonce), strict=True))
        raw = nonce + body + self._tag(nonce, body)
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def decode(self, cursor: str) -> int:
        """The position in ``cursor``; ``BadCursor`` unless this deployment made it."""
        if len(cursor) > 64:
            raise BadCursor("cursor too long")
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except (binascii.Error, ValueError):
            raise BadCursor("cursor is not base64url") from None
        if len(raw) != _LENGTH:
            raise BadCursor("cursor has the wrong length")
        nonce, body, tag = raw[:_NONCE], raw[_NONCE:_NONCE + _BODY], raw[_NONCE + _BODY:]
        if not hmac.compare_digest(tag, self._tag(nonce, body)):
            raise BadCursor("cursor was not issued by this server (or was altered)")
        plain = bytes(a ^ b for a, b in zip(body, self._stream(nonce), strict=True))
        return int.from_bytes(plain, "big")

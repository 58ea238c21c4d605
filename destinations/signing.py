"""Standard Webhooks request signing, so receivers can verify with any Standard Webhooks library.

signature = ``v1,`` + base64(HMAC-SHA256(key, ``{id}.{timestamp}.{body}``)), where the key
is the base64 part of a ``whsec_...`` secret. The key is decoded once per destination.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

SECRET_PREFIX = "whsec_"


class Signer:
    """Signs request bodies for one destination; holds the decoded key."""

    __slots__ = ("_key",)

    def __init__(self, secret: str) -> None:
        self._key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)

    def signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """The ``webhook-signature`` value for one message."""
        mac = hmac.new(self._key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
        return "v1," + base64.b64encode(mac.digest()).decode("ascii")

    def headers(self, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The three Standard Webhooks headers for one message."""
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.signature(msg_id, timestamp, body),
        }


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers for ``body``; ``timestamp`` is epoch seconds."""
    return Signer(secret).headers(msg_id, timestamp, body)

"""API keys as the gateway keeps them: only a SHA-256 hash of each key, under a name.

A plain, fast hash is the right tool here (not bcrypt/scrypt/argon2): the keys are
random tokens with 256 bits of entropy (`new_api_key`), so no dictionary or brute-force
attack on a leaked hash is feasible, and a slow hash would only cost CPU on every request.
Slow hashes exist for low-entropy human passwords, which these are not.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

HASH_SCHEME = "sha256"
_ENTRY = re.compile(r"sha256:([0-9a-f]{64})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: Bytes of randomness in a generated key (256 bits).
KEY_BYTES = 32

#: Shortest key `infermesh hash-key --stdin` accepts (a 24-character random token has 144
#: bits or more); the gateway cannot check a key's length from its hash.
MIN_KEY_CHARS = 24


def new_api_key() -> str:
    """A fresh random key, URL-safe so it fits in a header unquoted."""
    return secrets.token_urlsafe(KEY_BYTES)


def hash_api_key(key: str) -> str:
    """The configuration entry for `key`: `sha256:<64 hex>`."""
    return f"{HASH_SCHEME}:{hashlib.sha256(key.encode()).hexdigest()}"


def check_key_name(name: str) -> str:
    """`name` if it may name a key; names show up in logs, spans and rate limits."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"API key name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting with a letter"
            " or digit"
        )
    return name


def digest_of(name: str, entry: str) -> bytes:
    """The SHA-256 digest a configuration entry holds. The error never repeats the entry:
    a plaintext key pasted by mistake must not end up in a log."""
    match = _ENTRY.fullmatch(entry.strip().lower())
    if match is None:
        raise ValueError(
            f"API key {name!r} is not a key hash: configure the `sha256:<64 hex digits>` entry that"
            " `infermesh hash-key` prints, never the key itself"
        )
    return bytes.fromhex(match.group(1))


class ApiKeyRing:
    """The configured keys' digests by name; answers which key, if any, a caller offered."""

    def __init__(self, hashes: dict[str, str]) -> None:
        self._digests = [(check_key_name(name), digest_of(name, entry)) for name, entry in hashes.items()]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def name_of(self, offered: str) -> str | None:
        """The name of the key `offered` is, or None. Takes the same time whichever key
        matches, or none: the offered key is hashed once and compared with every digest
        in constant time, with no early exit."""
        digest = hashlib.sha256(offered.encode()).digest()
        found: str | None = None
        for name, expected in self._digests:
            if hmac.compare_digest(digest, expected):
                found = name
        return found

"""Who may read the worklist over HTTP: bearer token or HTTP basic users.

Secrets are compared as SHA-256 digests with ``hmac.compare_digest``, so neither their content
nor their length leaks through timing. Basic passwords may be stored hashed
(``pbkdf2_sha256$<iterations>$<salt>$<base64 hash>``, the format Django uses); make one with
``python -m node.auth``, which prompts for the password so it stays out of shell history.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from config.settings import HttpSettings

PBKDF2_PREFIX = "pbkdf2_sha256"
PBKDF2_ITERATIONS = 200_000  # ~0.1 s per check: basic auth re-sends the password with every request
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one request's credentials; ``user`` goes to the audit log.

    A refused request is recorded as anonymous: an unverified user name may be a mistyped
    password, which must never reach a log.
    """

    allowed: bool
    user: str


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS, salt: str | None = None) -> str:
    """A ``pbkdf2_sha256$...`` entry for ``http.users``."""
    salt = salt or secrets.token_hex(12)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"{PBKDF2_PREFIX}${iterations}${salt}${base64.b64encode(digest).decode()}"


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


def password_matches(given: str, stored: str) -> bool:
    """Check a password against a plain or a ``pbkdf2_sha256`` stored value."""
    if not stored.startswith(PBKDF2_PREFIX + "$"):
        return _same(given, stored)
    try:
        _, iterations, salt, _digest = stored.split("$", 3)
        return _same(hash_password(given, int(iterations), salt), stored)
    except ValueError:  # a malformed hash matches nothing
        return False


class Authenticator:
    """Applies ``http.auth`` to the ``Authorization`` header of a request."""

    def __init__(self, settings: HttpSettings) -> None:
        self._mode = settings.auth
        self._token = settings.token.get_secret_value() if settings.token is not None else ""
        self._users = {user: secret.get_secret_value() for user, secret in settings.users.items()}

    @property
    def enabled(self) -> bool:
        return self._mode != "none"

    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value of a 401 answer."""
        if self._mode == "basic":
            return 'Basic realm="pacsnode", charset="UTF-8"'
        return 'Bearer realm="pacsnode"'

    def check(self, authorization: str | None) -> Verdict:
        if self._mode == "none":
            return Verdict(True, ANONYMOUS)
        scheme, _, value = (authorization or "").strip().partition(" ")
        value = value.strip()
        if self._mode == "token":
            ok = scheme.lower() == "bearer" and bool(value) and _same(value, self._token)
            return Verdict(ok, "token" if ok else ANONYMOUS)
        if scheme.lower() != "basic":
            return Verdict(False, ANONYMOUS)
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return Verdict(False, ANONYMOUS)
        stored = self._users.get(user)
        if not sep or stored is None:
            password_matches(password, self._users[next(iter(self._users))])  # same work as a known user
            return Verdict(False, ANONYMOUS)
        ok = password_matches(password, stored)
        return Verdict(ok, user if ok else ANONYMOUS)


if __name__ == "__main__":
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise SystemExit("the passwords differ")
    print(hash_password(first))

"""The matching key: one normalised e-mail address per user, and the one-to-one rule."""

from __future__ import annotations

import re
import unicodedata

from domain.records import SharefileUser, SmUser

# One "@", something on both sides, no whitespace anywhere.
_USABLE = re.compile(r"[^@\s]+@[^@\s]+")


def normalise_email(raw: str | None) -> str | None:
    """Return the matching key of an address (trim, NFKC, case-fold), or None if it is unusable.

    A usable address has exactly one "@" with something on both sides, and no whitespace or
    control characters.
    """
    if raw is None:
        return None
    text = raw.strip()
    if text.isascii():
        # NFKC is the identity on ASCII and casefold() equals lower(): skip both for the common
        # case, and check with plain string methods (a million calls per big customer).
        key = text.lower()
        if (
            key.count("@") != 1
            or key[0] == "@"
            or key[-1] == "@"
            or " " in key
            or not key.isprintable()  # tabs, newlines and other control characters
        ):
            return None
    else:
        key = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
        # isprintable(): the same rule as the ASCII branch, so that a control character (NUL,
        # ESC, zero-width and other format characters) makes any address unusable, not only an
        # ASCII one.
        if _USABLE.fullmatch(key) is None or not key.isprintable():
            return None
    # Reuse the caller's string when nothing changed: a million users then cost one copy, not two.
    return raw if key == raw else key


def sm_user_key(user: SmUser) -> str | None:
    """SM `email` first; SM `username` only when `email` is unusable and `username` is an e-mail."""
    return normalise_email(user.email) or normalise_email(user.username)


def sharefile_user_key(user: SharefileUser) -> str | None:
    return normalise_email(user.email)

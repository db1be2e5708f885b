"""The matching key: one normalised e-mail address per user, and the one-to-one rule."""

from __future__ import annotations

import re
import unicodedata

from domain.records import SharefileUser, SmUser

# One "@", something on both sides, no whitespace anywhere.
_USABLE = re.compile(r"[^@\s]+@[^@\s]+")
# Characters no plain address holds: brackets, quotes, "mailto:" and list separators. An address
# with one ("<ann@acme.example>", '"eve"@acme.example') would be a key that matches nobody, and
# its Services Manager user would look absent; unusable, it holds removals instead.
_NOT_IN_AN_ADDRESS = re.compile(r'[<>()\[\]\\,;:"]')
# The same rules for an ASCII address in one match: printable characters but those, one "@",
# and a domain of dot-separated labels, none empty ("ann@acme.example." is nobody's address).
_ASCII_ADDRESS = re.compile(
    r"[!#-'*+\-./0-9=?A-Z^-~]+@[!#-'*+\-/0-9=?A-Z^-~]+(?:\.[!#-'*+\-/0-9=?A-Z^-~]+)*"
)


def normalise_email(raw: str | None) -> str | None:
    """Return the matching key of an address (trim, NFKC, case-fold), or None if it is unusable.

    A usable address has exactly one "@" with something on both sides, no whitespace, control
    characters or any of <>()[]\\,;:" (so no "mailto:" nor "<...>"), and a domain of non-empty
    dot-separated labels. An internationalised domain in its ASCII form ("xn--") is keyed by its
    Unicode form.
    """
    if raw is None:
        return None
    text = raw.strip()
    if text.isascii():
        # NFKC is the identity on ASCII and casefold() equals lower(): skip both for the common
        # case, and check with one match (a million calls per big customer).
        key = text.lower()
        if _ASCII_ADDRESS.fullmatch(key) is None:
            return None
    else:
        key = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
        # isprintable(): the same rule as the ASCII branch, so that a control character (NUL,
        # ESC, zero-width and other format characters) makes any address unusable, not only an
        # ASCII one.
        if (
            _USABLE.fullmatch(key) is None
            or not key.isprintable()
            or _NOT_IN_AN_ADDRESS.search(key) is not None
        ):
            return None
        domain = key[key.index("@") + 1 :]
        if domain[0] == "." or domain[-1] == "." or ".." in domain:
            return None
    if "xn--" in key:
        # An internationalised domain in its ASCII form: the key holds its Unicode form, which
        # the other side may have written.
        local, domain = key.split("@")
        try:
            # Punycode itself, not Python's "idna" codec: that one follows IDNA 2003 and refuses
            # labels with ß, final sigma or ZWNJ, which today's domains may hold.
            unicode_domain = ".".join(
                label[4:].encode("ascii").decode("punycode") if label.startswith("xn--") else label
                for label in domain.split(".")
            )
        except UnicodeError:
            unicode_domain = domain  # not valid punycode: keyed as written, as before
        key = f"{local}@{unicodedata.normalize('NFKC', unicode_domain.casefold())}"
    # Reuse the caller's string when nothing changed: a million users then cost one copy, not two.
    return raw if key == raw else key


def sm_user_key(user: SmUser) -> str | None:
    """SM `email` first; SM `username` only when `email` is unusable and `username` is an e-mail."""
    return normalise_email(user.email) or normalise_email(user.username)


def sharefile_user_key(user: SharefileUser) -> str | None:
    return normalise_email(user.email)

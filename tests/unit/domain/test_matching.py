"""The matching key: normalised e-mail addresses, and which field of each record provides it."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.matching import normalise_email, sharefile_user_key, sm_user_key
from domain.records import SharefileState, SharefileUser, SmUser


def sm(email: str | None = None, username: str | None = None) -> SmUser:
    return SmUser(id="u-1", state=SharefileState.NOT_PROVISIONED, email=email, username=username)


@pytest.mark.parametrize(
    "raw",
    [
        "john.doe@acme.example",
        "John.Doe@Acme.example",
        "JOHN.DOE@ACME.EXAMPLE",
        "jOhN.dOe@aCmE.eXaMpLe",
        "  John.Doe@Acme.example  ",
        "\tjohn.doe@acme.example\n",
        "ｊｏｈｎ.ｄｏｅ＠ａｃｍｅ.example",  # full-width letters and at-sign
        "ＪＯＨＮ．ＤＯＥ＠ＡＣＭＥ．ＥＸＡＭＰＬＥ",  # full-width capitals and full stops
    ],
)
def test_variants_of_one_address_share_one_key(raw: str) -> None:
    assert normalise_email(raw) == "john.doe@acme.example"


def test_full_width_address_from_the_issue_matches_its_ascii_form() -> None:
    assert normalise_email("ｊｏｈｎ＠ａｃｍｅ.example") == normalise_email("john@acme.example")


def test_composed_and_decomposed_accents_share_one_key() -> None:
    composed = "Jos\u00e9@Acme.example"
    decomposed = "Jose\u0301@acme.example"
    assert composed != decomposed
    assert normalise_email(composed) == normalise_email(decomposed)
    assert normalise_email(decomposed) == unicodedata.normalize("NFC", "josé@acme.example")


def test_case_folding_goes_beyond_lower_case() -> None:
    # casefold() maps the German sharp s to "ss"; lower() would leave it alone.
    assert normalise_email("STRASSE@acme.example") == normalise_email("straße@acme.example")


@pytest.mark.parametrize(
    "raw", ["ann@xn--bcher-kva.example", "ANN@XN--BCHER-KVA.EXAMPLE", "Ann@Bücher.example"]
)
def test_an_internationalised_domain_has_one_key_in_either_form(raw: str) -> None:
    assert normalise_email(raw) == "ann@bücher.example"


@pytest.mark.parametrize(
    ("ascii_form", "unicode_form"),
    [
        ("ann@xn--fa-hia.de", "ann@faß.de"),  # ß: refused by IDNA 2003, allowed today
        ("ann@xn--hxarsa0b.gr", "ann@ελλάς.gr"),  # a final sigma
    ],
)
def test_todays_internationalised_domains_keep_a_key_in_either_form(
    ascii_form: str, unicode_form: str
) -> None:
    assert normalise_email(ascii_form) == normalise_email(unicode_form) is not None


def test_an_xn_label_that_is_not_punycode_is_keyed_as_written() -> None:
    assert normalise_email("ann@xn--zz.example") == "ann@xn--zz.example"


@pytest.mark.parametrize(
    "raw", ["o'brien+tag@acme-corp.example", "a.b_c!#$%&*/=?^`{|}~@x.y", "ann@localhost"]
)
def test_unusual_but_plain_addresses_keep_their_key(raw: str) -> None:
    assert normalise_email(raw) == raw


def test_an_already_normal_address_is_returned_unchanged() -> None:
    assert normalise_email("ann@acme.example") == "ann@acme.example"


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "",
        "   ",
        "no-at-sign",
        "a@b@c",
        "@x",
        "x@",
        "@",
        "john doe@acme.example",
        "john@acme .example",
        "john\t@acme.example",
        "jo\nhn@acme.example",
        "jo\u00a0hn@acme.example",  # no-break space inside
        "josé doe@acme.example",  # inner space in a non-ASCII address
        "ｊｏｈｎ＠＠ａｃｍｅ.example",  # two full-width at-signs
        "a\x00b@acme.example",
        "é\x00@acme.example",  # a control character makes a non-ASCII address unusable too
        # Keys that would match nobody, so that the Services Manager user looks absent:
        "<ann@acme.example>",
        "Ann <ann@acme.example>",
        "mailto:ann@acme.example",
        '"ann"@acme.example',
        "ann@acme.example.",
        "ann@acme..example",
        "ann@.acme.example",
        "ann@acme.example;bob@acme.example",
        "josé@acme.example.",
        "josé@<acme>.example",
    ],
)
def test_unusable_addresses_have_no_key(raw: str | None) -> None:
    assert normalise_email(raw) is None


def test_sm_email_is_the_key_when_usable() -> None:
    user = sm(email="Ann@Acme.example", username="other@acme.example")
    assert sm_user_key(user) == "ann@acme.example"


def test_sm_username_is_the_key_when_email_is_unusable_and_username_is_an_address() -> None:
    assert sm_user_key(sm(email=None, username="Ann@Acme.example")) == "ann@acme.example"
    assert sm_user_key(sm(email="not an address", username="Ann@Acme.example")) == (
        "ann@acme.example"
    )


def test_sm_username_that_is_not_an_address_gives_no_key() -> None:
    assert sm_user_key(sm(email=None, username="ann")) is None
    assert sm_user_key(sm(email="", username="ACME\\ann")) is None


def test_sharefile_key_comes_from_email_only() -> None:
    assert sharefile_user_key(SharefileUser(id="sf-1", email=" Ann@Acme.example ")) == (
        "ann@acme.example"
    )
    assert sharefile_user_key(SharefileUser(id="sf-1", email=None, first_name="Ann")) is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_normalising_a_key_again_changes_nothing(raw: str) -> None:
    key = normalise_email(raw)
    if key is not None:
        assert normalise_email(key) == key
        assert key == key.strip()
        assert key.count("@") == 1


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii"), max_size=20))
def test_ascii_fast_path_agrees_with_the_unicode_path(raw: str) -> None:
    # Appending a non-ASCII letter that normalises to itself forces the general branch.
    fast = normalise_email(raw + "x")
    general = normalise_email(raw + "é")
    assert (fast is None) == (general is None)
    if fast is not None and general is not None:
        assert fast[:-1] == general[:-1]

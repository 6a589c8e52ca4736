"""Integers in text are ASCII decimal digits: '²' and other scripts' digits (which str.isdigit
accepts) are not numbers here, and a JSON key has one spelling per value."""

from cellserve.decimal_text import ascii_int, positive_key


def test_ascii_int_reads_ascii_digits_only():
    assert ascii_int("0") == 0 and ascii_int("007") == 7 and ascii_int("123") == 123
    for text in ("", "²", "١", "-1", "+1", " 1", "1.0", "1e3", None, 5, "9" * 5000):
        assert ascii_int(text) is None, text


def test_positive_key_has_one_spelling_per_value():
    assert positive_key("1") == 1 and positive_key("64") == 64
    for text in ("0", "01", "²", "١", "-3", "", "1 ", None, 2):
        assert positive_key(text) is None, text

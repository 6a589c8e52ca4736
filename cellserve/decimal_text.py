"""Integers written in text, as the formats cellserve reads mean them: ASCII decimal digits only.

`str.isdigit()` is true of '²' and of other scripts' digits ('١'), on which `int()` raises
or reads a number no one wrote; and '01' beside '1' makes two keys of one batch size. Every
place that reads an integer from a header, a file name or a JSON key goes through these."""

from __future__ import annotations

import re

_DIGITS = re.compile(r"[0-9]+")
_CANONICAL = re.compile(r"[1-9][0-9]*")


MAX_DIGITS = 18  # every number read here fits an int64; longer text is refused before int() reads it


def ascii_int(text: object) -> int | None:
    """The value of `text` when it is at most MAX_DIGITS ASCII decimal digits (leading zeros
    allowed), else None."""
    ok = isinstance(text, str) and len(text) <= MAX_DIGITS and _DIGITS.fullmatch(text)
    return int(text) if ok else None


def positive_key(text: object) -> int | None:
    """The value of `text` when it is a positive integer written the one way (no sign, no
    leading zero, ASCII digits), as a JSON object's integer keys must be; else None."""
    ok = isinstance(text, str) and len(text) <= MAX_DIGITS and _CANONICAL.fullmatch(text)
    return int(text) if ok else None

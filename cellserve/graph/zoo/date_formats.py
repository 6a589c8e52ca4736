"""The written forms of a date for the dates task (dates.py): `FORMATS` and `write_date`.

Every format is unambiguous under the task's conventions: numeric dates with the year last are
day/month/year, with the year first year/month/day; a two-digit year is 19yy for yy >= 50,
20yy below (dates lie in 1950..2049). Case and zero-padding vary where people vary them; `add_typo` misspells a long word.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Callable

import numpy as np

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 23 -> '23rd'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


_UNITS = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORDINAL_UNITS = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
                  "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
                  "seventeenth", "eighteenth", "nineteenth"]


def number_words(n: int) -> str:
    """0 < n < 100 in words: 7 -> 'seven', 42 -> 'forty-two'."""
    if n < 20:
        return _UNITS[n]
    return _TENS[n // 10] + (f"-{_UNITS[n % 10]}" if n % 10 else "")


def ordinal_words(n: int) -> str:
    """1 <= n <= 31 as an ordinal in words: 3 -> 'third', 20 -> 'twentieth', 23 -> 'twenty-third'."""
    if n < 20:
        return _ORDINAL_UNITS[n]
    if n % 10 == 0:
        return _TENS[n // 10][:-1] + "ieth"
    return f"{_TENS[n // 10]}-{_ORDINAL_UNITS[n % 10]}"


def year_words(year: int) -> str:
    """1998 -> 'nineteen ninety-eight', 2000 -> 'two thousand', 2004 -> 'two thousand and four',
    2017 -> 'twenty seventeen' (years 1950..2049)."""
    yy = year % 100
    if year < 2000:
        return f"nineteen {number_words(yy)}"
    if yy < 10:
        return "two thousand" + (f" and {number_words(yy)}" if yy else "")
    return f"twenty {number_words(yy)}"


def _month(d: dt.date, short: bool = False) -> str:
    return MONTHS[d.month - 1][:3] if short else MONTHS[d.month - 1]


def _weekday(d: dt.date, short: bool = False) -> str:
    return WEEKDAYS[d.weekday()][:3] if short else WEEKDAYS[d.weekday()]


def _yy(d: dt.date) -> str:
    return f"{d.year % 100:02d}"


# Each writes one date; the rng picks among small variations (case, padding) inside a format.
FORMATS: list[Callable[[dt.date, np.random.Generator], str]] = [
    lambda d, r: f"{ordinal(d.day)} of {_month(d)} {d.year}",                 # 3rd of March 1998
    lambda d, r: f"{d.day:02d}/{d.month:02d}/{_yy(d)}",                        # 03/03/98
    lambda d, r: f"{_month(d)} {d.day}, {d.year}",                             # March 3, 1998
    lambda d, r: f"{d.year}.{d.month}.{d.day}",                                # 1998.3.3
    lambda d, r: f"{_weekday(d, True)} {d.day} {_month(d, True)} {_yy(d)}",    # Tue 3 Mar 98
    lambda d, r: f"{d.day} {_month(d)} {d.year}",                              # 3 March 1998
    lambda d, r: f"{d.day:02d}-{_month(d, True)}-{d.year}",                    # 03-Mar-1998
    lambda d, r: f"{d.day}/{d.month}/{d.year}",                                # 3/3/1998
    lambda d, r: f"{d.day}.{d.month}.{_yy(d) if r.integers(2) else d.year}",   # 3.3.98, 3.3.1998
    lambda d, r: f"{_weekday(d)}, {_month(d)} {ordinal(d.day)}, {d.year}",     # Tuesday, March 3rd, 1998
    lambda d, r: f"{_month(d, True).lower()} {d.day} {_yy(d)}",                # mar 3 98
    lambda d, r: f"{d.year}{d.month:02d}{d.day:02d}",                          # 19980303
    lambda d, r: f"the {ordinal(d.day)} of {_month(d).lower()}, {d.year}",     # the 3rd of march, 1998
    lambda d, r: f"{_month(d).upper()} {ordinal(d.day).upper()} {d.year}",     # MARCH 3RD 1998
    lambda d, r: f"{d.year}-{d.month:02d}-{d.day:02d}",                        # 1998-03-03
    lambda d, r: f"{d.day} {_month(d, True)}. '{_yy(d)}",                      # 3 Mar. '98
    lambda d, r: f"{_month(d, True)} {d.day:02d} {d.year}",                    # Mar 03 1998
    lambda d, r: f"{d.year}/{d.month}/{d.day}",                                # 1998/3/3
    lambda d, r: f"the {ordinal_words(d.day)} of {_month(d).lower()}, {year_words(d.year)}",
    lambda d, r: f"{_month(d)} {ordinal_words(d.day)}, {d.year}",              # March third, 1998
    lambda d, r: f"{d.day} {_month(d)} {year_words(d.year)}",                  # 3 March nineteen ninety-eight
]


TYPO_MIN_WORD = 5  # shorter words stay intact: one edit can turn "Jun" into "Jan" or "May" into "Ma"


def add_typo(text: str, rng: np.random.Generator) -> str:
    """One edit (delete, substitute a lower-case letter, or swap with the next letter) at a
    letter inside an alphabetic run of at least TYPO_MIN_WORD letters; digits and punctuation
    are never touched, so the date stays readable. Text without such a run comes back as is."""
    spots = [m.start() + i for m in re.finditer(r"[A-Za-z]{%d,}" % TYPO_MIN_WORD, text)
             for i in range(len(m.group()) - 1)]  # not the last letter: a swap needs a letter after it
    if not spots:
        return text
    i, kind = spots[int(rng.integers(len(spots)))], int(rng.integers(3))
    if kind == 0:
        return text[:i] + text[i + 1:]
    if kind == 1:
        return text[:i] + chr(ord("a") + int(rng.integers(26))) + text[i + 1:]
    return text[:i] + text[i + 1] + text[i] + text[i + 2:]


def write_date(date: dt.date, kind: int, rng: np.random.Generator) -> str:
    """The date in format FORMATS[kind]. Raises ValueError naming a kind outside the list."""
    if not 0 <= kind < len(FORMATS):
        raise ValueError(f"date format {kind} does not exist (there are {len(FORMATS)}: 0..{len(FORMATS) - 1})")
    return FORMATS[kind](date, rng)

"""Argument types the subcommands share (argparse `type=` callables): each turns bad text into
an error that argparse prints beside the flag's name."""

from __future__ import annotations

import argparse
import math


def positive(kind=float):
    """A number of `kind` (int or float) that must be > 0 and finite."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}") from None
        if not 0 < value < math.inf:  # also refuses NaN and infinity
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}" if kind is int else
                                             f"must be a finite number > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def int_in(low: int, high: int):
    """An integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse

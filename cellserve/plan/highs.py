"""One way to make a HiGHS solver for every planner: silent, and with HiGHS's own thread
settings left alone.

Why one place: HiGHS prints a banner from C++ to the process's stdout (fd 1) the first time an
instance is made, before any option can turn output off, and a CLI's stdout is its report; so
that construction runs with fd 1 pointed at /dev/null. And HiGHS runs every instance of a
process on one global scheduler, sized by the first solve: an instance that later asks for
another `threads` value fails to solve (status "Not Set"), so no planner sets it."""

from __future__ import annotations

import os
import sys

import highspy


def silent_highs() -> highspy.Highs:
    """A new HiGHS instance that prints nothing."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    h.setOptionValue("output_flag", False)
    return h

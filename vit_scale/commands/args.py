"""The command line's own checks: every command parses with `Parser`, and every numeric option declares its
range in its `type`, so a bad value is refused before any work starts, as one line naming the option (exit 2)
like every other user error, instead of argparse's usage block or a traceback from deep inside the work.
Options whose cost only shows while working (a resolution, a batch size) name themselves when memory runs
out (`memory_for`)."""

from __future__ import annotations

import argparse
import contextlib
import math
import re
from collections.abc import Callable, Iterator

from vit_scale.errors import UserError


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse says "argument --x: must be ..." for a failed type: name the option as the other errors do.
        message = re.sub(r"^argument (\S+): (must be .*)$", r"\1 \2", message)
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def between(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        value = _integer(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers, got {text!r}")
    return values


@contextlib.contextmanager
def memory_for(options: str) -> Iterator[None]:
    """Running out of memory inside the block is a one-line error asking to lower `options`."""
    try:
        yield
    except RuntimeError as e:  # torch's CPU allocator and CUDA's OutOfMemoryError both raise RuntimeErrors
        if "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        raise UserError(f"out of memory with {options}; lower them") from None

"""argparse ``type=`` functions that refuse a bad number with a message, not a traceback.

``lbctl run --interval -5`` used to crash deep in the loop and ``--interval 0`` to spin a CPU:
every numeric option of the CLI goes through one of these, so argparse prints
``lbctl run: error: argument --interval: must be > 0 (got -5)`` and exits 2.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

U32_MAX = 0xFFFFFFFF


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text.replace("_", "")) if kind is int else kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{'a whole number' if kind is int else 'a number'} expected (got {text!r})") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"a finite number expected (got {text!r})")
    return value


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number in [low, high] (no upper bound with None)."""
    def parse(text: str) -> int:
        value = int(_number(text, int))
        if value < low or (high is not None and value > high):
            span = f"{low}-{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"out of range ({span}; got {value})")
        return value
    parse.__name__ = "int"     # argparse names the type in some messages
    return parse


def positive_float(text: str) -> float:
    """Seconds and the like: a finite number > 0."""
    value = float(_number(text, float))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def non_negative_float(text: str) -> float:
    """Seconds that may be 0 (no bound): a finite number >= 0."""
    value = float(_number(text, float))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {text})")
    return value


def counts(text: str) -> str:
    """Comma-separated counts >= 1 ("10,100000", "1_000"), returned normalised ("10,100000")."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated counts, e.g. 10,1000")
    parse = int_range(1)
    return ",".join(str(parse(p)) for p in parts)


def port_range(text: str) -> tuple[int, int]:
    """kube-apiserver's --service-node-port-range: "30000-32767", "30000+2767" or one port."""
    from lbctl.sources.validate import parse_port_range

    try:
        return parse_port_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


positive_int = int_range(1)
map_size = int_range(1, U32_MAX)        # BPF map max_entries is a u32
id_count = int_range(2, U32_MAX)        # ids 1..n-1 (0 means "none"): at least one id


def maglev_table_size(text: str) -> int:
    """A Maglev table size: a prime from 3 to 131071 (Cilium's largest)."""
    from lbctl.model.objects import is_prime

    value = int_range(3, 131071)(text)
    if not is_prime(value):
        raise argparse.ArgumentTypeError(f"{value} is not prime (for example 251, 1021, 4093, 16381, 65521)")
    return value

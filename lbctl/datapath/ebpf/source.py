"""The text bcc compiles: a program file with lbctl's own headers inlined.

bcc rewrites map calls (``lb4_ct.lookup(&key)``) into helper calls only in the source it is
given, never in the headers clang reads from disk, so the library in ``bpf/lib/`` (conntrack,
backend selection...) could not touch a map if it were included normally. Inlining the quoted
``#include``s that resolve under ``bpf/`` (the directories the loader's ``-I`` flags name) makes
one text of it; ``#line`` markers keep compiler and verifier messages naming the real files.
System headers (``<...>``) are left to clang.
"""
from __future__ import annotations

import re
from pathlib import Path

from lbctl.datapath.ebpf import shared

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def search_path() -> list[Path]:
    """Where quoted includes are found: the same directories as the loader's -I flags."""
    return [shared.BPF_DIR, shared.BPF_DIR / "include"]


def program_text(path: Path) -> bytes:
    """The program at `path` with every lbctl header it includes inlined, once each."""
    seen: set[Path] = set()
    out: list[str] = []

    def inline(file: Path) -> None:
        seen.add(file)
        out.append(f'#line 1 "{file}"')
        for number, line in enumerate(file.read_text().splitlines(), 1):
            match = _INCLUDE.match(line)
            header = _resolve(match.group(1), file.parent) if match else None
            if header is None:
                out.append(line)
                continue
            if header not in seen:
                inline(header)
            out.append(f'#line {number + 1} "{file}"')

    inline(Path(path).resolve())
    return ("\n".join(out) + "\n").encode()


def _resolve(name: str, directory: Path) -> Path | None:
    for base in (directory, *search_path()):
        candidate = (base / name).resolve()
        if candidate.is_file():
            return candidate
    return None

"""The manifest source: Services and endpoints from a directory of Kubernetes manifests.

It is lbctl's stand-in for the API server. ``ManifestSource`` watches a directory (a stat per
file per poll); ``load_manifests`` reads one once (``lbctl render``, the bench). The objects are
validated as the API server would (``lbctl.sources.validate``) and joined into a snapshot by the
rules every source shares (``lbctl.sources.base``).

What is read:

* Files named ``*.yaml``, ``*.yml`` or ``*.json``, in the directory and, recursively, in its
  subdirectories, in the sorted order of their path components. Subdirectories are read because
  lbctl always read them: a layout by namespace or by app keeps working, and an upgrade never
  drops the services kept in one.
* Regular files only, or symbolic links to regular files (a ConfigMap volume is links).
* Hidden entries (names starting with ``.``) and files with other suffixes are passed over
  silently: a ConfigMap volume holds every file twice (``name.yaml`` and
  ``..2024_01_01.../name.yaml``), ``.git`` and editor swap files hold nothing for us.

Skipped, with one Problem each (the rest is read): entries named like manifests that are not
regular files (a directory named ``x.yaml``, a FIFO, a socket, a device, a broken or looping
link), files larger than ``MAX_FILE_BYTES``, symbolic links to directories (not followed: they
can loop), a directory reached a second time (a bind mount), subdirectories that cannot be
listed. A file is opened ``O_NONBLOCK | O_NOCTTY`` and checked with ``fstat`` after the open (a
swap between listing and opening is caught), and at most ``MAX_FILE_BYTES + 1`` bytes are read
whatever ``st_size`` says: no entry can block the agent or make it grow without bound.

A directory that cannot be read at all (missing, not a directory, permission denied, cannot be
listed) raises ``SourceUnavailable``: it never means "no services".

Last good objects: a file that stops parsing, or can no longer be read, keeps the documents it
last parsed to, as the API server keeps the old object when an update is invalid: a typo while
editing never deletes the file's services. An object (kind namespace/name) that still parses but
is now invalid (``port: 99999``) keeps its last valid version, with a Problem naming it, the
file and the error. Files under a subdirectory that cannot be listed keep their objects until it
can be listed again. An object removed from its file is removed; a file that is gone takes its
objects with it.

A name defined twice (two files hold ``Service default/web``): the copy that is programmed
keeps it, so adding a file never moves a live service; at the very first read the copy in the
file that sorts first wins. Every duplicate is a Problem naming both files.

With ``state_path``, these memories (the text of every file's last good version, the last
valid version of every object, and which file holds each name) survive a restart: written
atomically (a temporary file, then a rename) when they change or the file is found missing
(``lbctl cleanup --force``), read at the first poll. A state file that cannot be read or makes no sense is
reported and ignored, never fatal.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from lbctl.model.objects import ClusterSnapshot, Problem
from lbctl.sources.base import Source, SourceUnavailable, build_snapshot, join
from lbctl.sources.validate import DEFAULT_NODE_PORT_RANGE, Parsed, parse_document, parse_documents

__all__ = [
    "DEFAULT_NODE_PORT_RANGE",
    "MANIFEST_SUFFIXES",
    "MAX_FILE_BYTES",
    "ManifestSource",
    "Source",
    "SourceUnavailable",
    "build_snapshot",
    "load_manifests",
    "parse_documents",
]

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 64 << 20   # a manifest file larger than this is refused, not parsed
MAX_NESTING = 200           # [ and { nesting: Kubernetes objects need a dozen levels
RACY_WINDOW_NS = 2_000_000_000                              # see ManifestSource.poll
STATE_KIND = "lbctl-manifest-source-state"
STATE_VERSION = 1

# Never block in open() (a FIFO without writer, a tty), never become a terminal's controller.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml when available: 10x faster


# --- public API ------------------------------------------------------------------------------


def load_manifests(directory: Path | str,
                   node_port_range: tuple[int, int] = DEFAULT_NODE_PORT_RANGE) -> ClusterSnapshot:
    """Read every manifest under ``directory`` once into a snapshot (no memory of earlier reads).

    Bad input is never an exception: unreadable files, malformed YAML and invalid objects all
    end up in ``snapshot.problems``. A directory that cannot be read at all raises
    ``SourceUnavailable``.
    """
    entries, problems, _ = _scan(Path(directory))
    return _build(entries, problems, node_port_range, memory=None)


class ManifestSource:
    """A ``Source`` that watches a directory of manifests.

    ``poll()`` stats every manifest file and re-reads the directory only when the set of files or
    a file's (mtime_ns, size, inode) changed since the last snapshot. ``interval`` is how often
    the agent should call ``poll()``, in seconds. ``state_path``: where the last good objects and
    the owners of duplicated names are kept across restarts (``None``: in memory only).
    ``node_port_range``: the cluster's kube-apiserver ``--service-node-port-range``.
    """

    def __init__(self, directory: Path | str, interval: float = 1.0, state_path: Path | str | None = None,
                 *, node_port_range: tuple[int, int] = DEFAULT_NODE_PORT_RANGE) -> None:
        self.directory = Path(directory)
        self.interval = interval
        self.state_path = Path(state_path) if state_path is not None else None
        self.node_port_range = node_port_range
        self._fingerprint: tuple | None = None
        self._snapshot: ClusterSnapshot | None = None
        self._racy = False
        self._memory = _Memory()
        self._files: dict[Path, _ParsedFile] = {}   # last parse of each file, reused while unchanged
        self._state_read = False
        self._saved: _Memory | None = None       # what the state file holds, when known
        self._state_problems: list[Problem] = []  # reading it, for the first snapshot
        self._write_problem: Problem | None = None

    def poll(self) -> ClusterSnapshot | None:
        """Return a fresh snapshot the first time and after any change, else ``None``.

        Raises ``SourceUnavailable`` when the directory cannot be read at all; the next poll
        that can read it answers relative to the last snapshot returned.

        A file written twice within the file system's timestamp granularity can keep the same
        mtime and size ("racy git" problem). So while any file is younger than RACY_WINDOW_NS
        the directory is re-read on every poll, and the snapshot is returned only if its content
        differs from the last one.
        """
        scan_started = time.time_ns()
        entries, problems, unlisted = _scan(self.directory)
        if not self._state_read:
            self._read_state()
        if self._write_problem is not None:
            self._write_state()                  # retry a write that failed
        elif self._saved is not None and self.state_path is not None and not self.state_path.exists():
            self._write_state()                  # deleted behind our back (lbctl cleanup --force)
        fingerprint = _fingerprint(entries, problems)
        if self._snapshot is not None and fingerprint == self._fingerprint and not self._racy:
            return None
        snapshot = _reuse(_build(entries, problems, self.node_port_range, self._memory, unlisted, self._files),
                          self._snapshot)
        if self.state_path is not None and self._saved != self._memory:
            self._write_state()
        extra = self._state_problems + ([self._write_problem] if self._write_problem else [])
        self._state_problems = []
        if extra:
            snapshot = dataclasses.replace(snapshot, problems=snapshot.problems + tuple(extra))
        news = (
            self._snapshot is None
            or fingerprint != self._fingerprint
            or snapshot != self._snapshot
        )
        self._fingerprint, self._snapshot = fingerprint, snapshot
        self._racy = _is_racy(entries, scan_started)
        return snapshot if news else None

    # --- the state file ---

    def _read_state(self) -> None:
        self._state_read = True
        if self.state_path is None:
            return
        memory, problem = _read_state(self.state_path, self.directory)
        if problem is not None:
            self._state_problems.append(problem)
        if memory is not None:
            self._memory = memory
            self._saved = memory.copy()

    def _write_state(self) -> None:
        if self.state_path is None:
            return
        self._write_problem = _write_state(self.state_path, self.directory, self._memory)
        if self._write_problem is None:
            self._saved = self._memory.copy()


def _reuse(snapshot: ClusterSnapshot, last: ClusterSnapshot | None) -> ClusterSnapshot:
    """``snapshot`` with each Service, and each service's slices, that equals last snapshot's
    replaced by last snapshot's very object. A file that changed is parsed again whole, into new
    objects; the desired-state caches, which know objects by identity, then compute again only
    the services that really changed, not every service of the file."""
    if last is None:
        return snapshot
    old_services, old_slices = last.services, last.slices
    services = {key: old if (old := old_services.get(key)) is not None and (old is s or old == s) else s
                for key, s in snapshot.services.items()}
    slices = {key: was if (was := old_slices.get(key)) is not None and (was is t or was == t) else t
              for key, t in snapshot.slices.items()}
    return dataclasses.replace(snapshot, services=services, slices=slices)


# --- the directory ---------------------------------------------------------------------------


class _Entry(NamedTuple):
    """A manifest-named entry: a regular file (and its stat), or why it is skipped."""

    path: Path
    state: tuple[int, int, int, int] | None      # (mtime_ns, size, inode, device) of the file
    problem: Problem | None


def _scan(directory: Path) -> tuple[list[_Entry], list[Problem], tuple[Path, ...]]:
    """Every manifest-named entry under ``directory``, sorted by path components, the
    problems of directories skipped, and the subdirectories that could not be listed. Raises
    ``SourceUnavailable`` if ``directory`` itself cannot be read."""
    source = f"manifests directory {directory}"
    try:
        top = os.stat(directory)
    except OSError as error:
        raise SourceUnavailable(source, _unavailable(error)) from None
    if not stat.S_ISDIR(top.st_mode):
        raise SourceUnavailable(source, "is not a directory")
    entries: list[_Entry] = []
    problems: list[Problem] = []
    unlisted: list[Path] = []
    seen = {(top.st_dev, top.st_ino): directory}
    pending = [directory]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as listing:
                items = sorted(listing, key=lambda item: item.name)
        except OSError as error:
            if folder == directory:
                raise SourceUnavailable(source, _unavailable(error, "cannot list it")) from None
            unlisted.append(folder)
            problems.append(Problem(f"directory {folder}", f"cannot list: {error.strerror or error}; "
                                                           "its manifests skipped, others loaded"))
            continue
        for item in items:
            if item.name.startswith("."):
                continue
            path = Path(folder, item.name)
            if item.name.endswith(MANIFEST_SUFFIXES):
                entry = _manifest_entry(path, item)
                if entry is not None:
                    entries.append(entry)
                continue
            try:
                if item.is_dir(follow_symlinks=False):
                    st = item.stat(follow_symlinks=False)
                elif item.is_symlink() and os.path.isdir(path):
                    problems.append(Problem(f"directory {path}", "is a symbolic link to a directory, "
                                            "not followed (links can loop); its manifests skipped, others loaded"))
                    continue
                else:
                    continue                     # README.txt and the like
            except OSError:
                continue                         # gone since the listing
            first = seen.get((st.st_dev, st.st_ino))
            if first is not None:
                problems.append(Problem(f"directory {path}", f"is {first} again (a bind mount?); "
                                                             "read once, skipped here"))
                continue
            seen[(st.st_dev, st.st_ino)] = path
            pending.append(path)
    entries.sort(key=lambda e: e.path.relative_to(directory).parts)
    problems.sort(key=lambda p: Path(p.obj.removeprefix("directory ")).parts)
    return entries, problems, tuple(unlisted)


def _manifest_entry(path: Path, item: os.DirEntry) -> _Entry | None:
    """A regular file (or a link to one) with its stat, or why it is skipped; None if gone."""
    obj = f"file {path}"
    try:
        link = item.is_symlink()
        st = os.stat(path)                       # follows links: ConfigMap volumes swap them
    except OSError as error:
        if not link:
            return None if isinstance(error, FileNotFoundError) else _Entry(
                path, None, Problem(obj, f"cannot read: {error.strerror or error}; file skipped, others loaded"))
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return _Entry(path, None, Problem(obj, f"is a broken symbolic link (to {target}: "
                                               f"{error.strerror or error}); file skipped, others loaded"))
    if stat.S_ISREG(st.st_mode):
        return _Entry(path, (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev), None)
    if stat.S_ISDIR(st.st_mode):
        return _Entry(path, None, Problem(obj, "is a directory named like a manifest file; not read "
                                               "(rename it if it holds manifests), others loaded"))
    return _Entry(path, None, Problem(obj, f"is {_file_kind(st.st_mode)}, not a regular file; "
                                           "file skipped, others loaded"))


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a special file"


def _unavailable(error: OSError, doing: str = "") -> str:
    if isinstance(error, FileNotFoundError):
        return "does not exist"
    if isinstance(error, NotADirectoryError):
        return "is not a directory"
    if isinstance(error, PermissionError):
        return f"permission denied{' (' + doing + ')' if doing else ''}"
    return f"{doing or 'cannot read it'}: {error.strerror or error}"


def _fingerprint(entries: list[_Entry], problems: list[Problem]) -> tuple:
    """What must stay equal for the directory to count as unchanged: names, stats, problems."""
    return tuple(entries), tuple(problems)


def _is_racy(entries: list[_Entry], scan_started_ns: int) -> bool:
    """True when some file is so young that a later write might not change its mtime.

    Bounded on both sides: a file whose mtime is more than the window in the future (a clock
    that was ahead, ``touch -d``, an archive) is not racy, since a write now gives it a new
    mtime (the present) that differs from the one recorded; otherwise such a file would make
    every poll re-read the whole directory until the clock catches up."""
    low, high = scan_started_ns - RACY_WINDOW_NS, scan_started_ns + RACY_WINDOW_NS
    return any(e.state is not None and low <= e.state[0] <= high for e in entries)


# --- files -----------------------------------------------------------------------------------


@dataclass
class _Memory:
    """What a watching source remembers between reads (and, with a state file, restarts)."""

    last_good: dict[Path, str] = field(default_factory=dict)  # file -> text of its last good version
    owners: dict[str, str] = field(default_factory=dict)      # "Service ns/name" -> origin programmed
    objects: dict[Path, dict[str, str]] = field(default_factory=dict)  # file -> label -> last valid (JSON)

    def copy(self) -> _Memory:
        return _Memory(dict(self.last_good), dict(self.owners),
                       {path: dict(objs) for path, objs in self.objects.items()})


@dataclass(frozen=True)
class _ParsedFile:
    """A file as last parsed, to be reused while its content stays the same: its stat, whether
    that stat can be trusted (the file was older than the racy window when read), the digest
    and text of its content, the object memory it left, and what it parsed to."""

    state: tuple[int, int, int, int] | None
    settled: bool
    digest: bytes
    text: str
    objects: dict[str, str] | None
    parsed: Parsed


def _build(entries: list[_Entry], problems: list[Problem], node_port_range: tuple[int, int],
           memory: _Memory | None, unlisted: tuple[Path, ...] = (),
           files: dict[Path, _ParsedFile] | None = None) -> ClusterSnapshot:
    """Parse files into a snapshot. With ``memory`` (a watching source's), a file that stops
    parsing keeps the documents it last parsed to, an object that becomes invalid keeps its last
    valid version, the files under a directory that cannot be listed (``unlisted``) keep theirs,
    and duplicated names stay where they were.

    With ``files`` (a watching source's, with ``memory``), a file whose content did not change
    since it was last parsed is not parsed again: its stat (mtime, size, inode, device) is the
    same and was taken outside the racy window, or its content has the same digest. Its objects
    are the very objects of the last snapshot, which the desired-state caches key on."""
    parsed = Parsed(problems=list(problems))
    if memory is not None:
        present = {e.path for e in entries}
        hidden = [path for path in memory.last_good
                  if path not in present and any(path.is_relative_to(d) for d in unlisted)]
        entries = sorted(entries + [_Entry(path, None, Problem(f"file {path}", "in a directory that cannot "
                                                               "be listed")) for path in hidden],
                         key=lambda e: e.path.parts)
        present.update(hidden)
        for gone in [path for path in memory.last_good if path not in present]:
            del memory.last_good[gone]
        for gone in [path for path in memory.objects if path not in present]:
            del memory.objects[gone]
    for entry in entries:
        hit, data = _unchanged(entry, memory, files) if files is not None else (None, None)
        if hit is not None:                      # the same content as last time: reused as is
            _extend(parsed, hit.parsed)
            continue
        one = Parsed()
        text, docs, problem, digest = _read_entry(entry, data)
        if memory is not None:
            if problem is None and text is not None:
                memory.last_good[entry.path] = text
            elif problem is not None and entry.path in memory.last_good:
                docs, _ = _parse_text(entry.path, memory.last_good[entry.path])
                reason = problem.message.split("; ")[0]
                problem = Problem(problem.obj, f"{reason}; keeping the {len(docs)} document(s) it last "
                                               "held until it is fixed")
        if memory is None:
            for number, doc in enumerate(docs, start=1):
                parse_document(one, doc, str(entry.path), f"document {number}", node_port_range)
        else:
            _parse_remembering(one, docs, entry.path, node_port_range, memory)
        if problem:
            one.problems.append(problem)
        _extend(parsed, one)
        if files is not None and memory is not None:
            files.pop(entry.path, None)
            if problem is None and text is not None and digest is not None:
                files[entry.path] = _ParsedFile(entry.state, _settled(entry.state), digest, text,
                                                memory.objects.get(entry.path), one)
    if files is not None:
        for gone in files.keys() - {e.path for e in entries}:
            del files[gone]
    if memory is None:
        return join(parsed.services, parsed.records, parsed.problems)
    won: dict[str, str] = {}
    snapshot = join(parsed.services, parsed.records, parsed.problems, owners=memory.owners, won=won)
    memory.owners = won
    return snapshot


def _extend(parsed: Parsed, one: Parsed) -> None:
    parsed.services.extend(one.services)
    parsed.records.extend(one.records)
    parsed.problems.extend(one.problems)


def _settled(state: tuple[int, int, int, int] | None) -> bool:
    """The file's mtime is older than the racy window: a later write changes its stat."""
    return state is not None and state[0] < time.time_ns() - RACY_WINDOW_NS


def _unchanged(entry: _Entry, memory: _Memory | None,
               files: dict[Path, _ParsedFile]) -> tuple[_ParsedFile | None, bytes | None]:
    """The last parse of this file if its content is the same and the memory it left is
    still the memory (a state file read since, or a directory outage: parsed anew); else
    None and the content, when it was read to compare its digest."""
    hit = files.get(entry.path)
    if hit is None or entry.problem is not None or memory is None:
        return None, None
    if memory.objects.get(entry.path) is not hit.objects or memory.last_good.get(entry.path) is not hit.text:
        return None, None
    if hit.settled and hit.state == entry.state:
        return hit, None                         # not even read
    try:
        data = _read_file(entry.path)
    except (_Skip, OSError):
        return None, None                        # parsed anew, which reports why
    if _digest(data) != hit.digest:
        return None, data
    files[entry.path] = dataclasses.replace(hit, state=entry.state, settled=_settled(entry.state))
    return hit, None


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _units(docs: list[Any]) -> list[tuple[Any, str]]:
    """The documents of a file and the items of its Lists, each with its position."""
    units: list[tuple[Any, str]] = []
    for number, doc in enumerate(docs, start=1):
        position = f"document {number}"
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list):
            units.extend((item, f"{position} item {i}") for i, item in enumerate(doc["items"], start=1))
        else:
            units.append((doc, position))
    return units


def _parse_remembering(parsed: Parsed, docs: list[Any], path: Path, node_port_range: tuple[int, int],
                       memory: _Memory) -> None:
    """Parse one file's documents into ``parsed``; an object (kind namespace/name) that is
    invalid now but was valid before keeps its last valid version, as the API server refuses an
    invalid update and keeps the old object. Remembers every valid object of the file."""
    origin = str(path)
    before = memory.objects.get(path, {})
    now: dict[str, str] = {}
    results: list[tuple[str, Parsed, set[str]]] = []
    for unit, position in _units(docs):
        one = Parsed()
        parse_document(one, unit, origin, position, node_port_range)
        labels = {f"Service {s.key}" for s in one.services} | {r.label for r in one.records}
        for label in labels:
            if label not in now:
                try:
                    now[label] = json.dumps(unit, sort_keys=True, default=str)
                except (TypeError, ValueError, RecursionError):
                    pass                         # cannot be kept (a recursive YAML alias)
        results.append((position, one, labels))
    for position, one, labels in results:
        invalid = one.problems[0].obj if one.problems and not labels else None
        if invalid is not None and invalid not in now and invalid in before:
            old = Parsed()
            try:
                parse_document(old, json.loads(before[invalid]), origin, position, node_port_range)
            except ValueError:                   # a state file edited by hand
                pass
            if {f"Service {s.key}" for s in old.services} | {r.label for r in old.records} == {invalid}:
                error = one.problems[0].message.removesuffix(f" ({origin})").rsplit("; ", 1)[0]
                parsed.services.extend(old.services)
                parsed.records.extend(old.records)
                parsed.problems.append(Problem(invalid, f"invalid in {origin} ({position}): {error}; the "
                                                      "previous valid version stays programmed until it is fixed"))
                now[invalid] = before[invalid]
                continue
        parsed.services.extend(one.services)
        parsed.records.extend(one.records)
        parsed.problems.extend(one.problems)
    if now:
        memory.objects[path] = now
    else:
        memory.objects.pop(path, None)


class _Skip(Exception):
    """A file that is not read: why, as the start of a Problem message."""


def _read_regular(path: Path, limit: int | None) -> bytes:
    """The content of a regular file (a link to one is followed), at most ``limit`` bytes.

    The open cannot block (O_NONBLOCK: a FIFO swapped in after the listing), the fd is checked
    to be a regular file, and reading stops after ``limit + 1`` bytes, because ``st_size`` can
    lie (procfs reports 0, a file can grow while it is read)."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Skip(f"is {_file_kind(st.st_mode)}, not a regular file")
        if limit is not None and st.st_size > limit:
            raise _Skip(f"larger than {_size(limit)}")
        chunks: list[bytes] = []
        total = 0
        want = st.st_size + 1
        while True:
            size = max(want, 1 << 16)
            if limit is not None:
                size = min(size, limit + 1 - total)
            chunk = os.read(fd, size)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if limit is not None and total > limit:
                raise _Skip(f"larger than {_size(limit)}")
            want = total                         # st_size was wrong: grow geometrically
    finally:
        os.close(fd)


def _read_file(path: Path) -> bytes:
    """A manifest file's content (every read of one goes through here)."""
    return _read_regular(path, MAX_FILE_BYTES)


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"


def _read_entry(entry: _Entry, data: bytes | None = None) -> tuple[str | None, list[Any], Problem | None,
                                                                  bytes | None]:
    """An entry's text, documents, Problem and content digest (the entry's own problem when it
    is not a readable file); ``data``: its content, when already read."""
    if entry.problem is not None:
        return None, [], entry.problem, None
    return _read_documents(entry.path, data)


def _read_documents(path: Path, data: bytes | None = None) -> tuple[str | None, list[Any], Problem | None,
                                                                    bytes | None]:
    """Load one file: (its text, its documents, a Problem, the digest of its bytes). On a
    syntax error the documents before it are kept; the text is given only when the whole file
    was read."""
    obj = f"file {path}"
    try:
        data = _read_file(path) if data is None else data
    except _Skip as skip:
        return None, [], Problem(obj, f"{skip}; file skipped, others loaded"), None
    except OSError as error:
        return None, [], Problem(obj, f"cannot read: {error.strerror or error}; file skipped, others loaded"), None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, [], Problem(obj, f"not UTF-8 ({error.reason} at byte {error.start}); file skipped, "
                                      "others loaded"), None
    docs, problem = _parse_text(path, text)
    return text, docs, problem, _digest(data)


def _parse_text(path: Path, text: str) -> tuple[list[Any], Problem | None]:
    """The documents of a file's text; on a syntax error the ones before it and a Problem."""
    obj = f"file {path}"
    depth = _flow_depth(text)
    if depth > MAX_NESTING:
        # libyaml recurses per level and overflows the C stack long before Python notices:
        # refuse such a file before parsing it.
        return [], Problem(obj, f"nested {depth} levels deep (at most {MAX_NESTING}); file skipped, "
                                "others loaded")
    if path.suffix == ".json":
        try:
            return [json.loads(text)], None
        except json.JSONDecodeError as error:
            return [], Problem(obj, f"malformed JSON at line {error.lineno}: {error.msg}; file skipped, others loaded")
        except RecursionError:
            return [], Problem(obj, "nested too deep; file skipped, others loaded")
    docs: list[Any] = []
    try:
        for doc in yaml.load_all(text, Loader=_YamlLoader):
            docs.append(doc)
    except yaml.YAMLError as error:
        return docs, Problem(obj, f"malformed YAML{_yaml_position(error)}: {_yaml_reason(error)}; "
                                  f"{len(docs)} document(s) before it kept, rest of the file skipped")
    except RecursionError:
        return docs, Problem(obj, f"nested too deep; {len(docs)} document(s) before it kept, rest of "
                                  "the file skipped")
    return docs, None


_BRACKETS = re.compile(r"[][{}]")


def _flow_depth(text: str) -> int:
    """The deepest nesting of [ and { in the text (quotes ignored: an upper bound). Only the
    brackets are visited, so block-style YAML costs next to nothing."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(text):
        if match.group() in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif depth:
            depth -= 1
    return deepest


def _yaml_position(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _yaml_reason(error: yaml.YAMLError) -> str:
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    return ", ".join(p for p in parts if p) or str(error)


# --- the state file --------------------------------------------------------------------------
#
# One JSON document: {"kind": STATE_KIND, "version": 1, "directory": "/abs/dir",
#   "files": {"relative/path.yaml": "text of its last good version", ...},
#   "owners": {"Service default/web": "relative/path.yaml", ...},
#   "objects": {"relative/path.yaml": {"Service default/web": "JSON of its last valid version"}}}
# ("objects" is optional: a state written before it existed reads as having none.)
# Paths are relative to the directory, so a relative --manifests survives a change of cwd.


def _read_state(path: Path, directory: Path) -> tuple[_Memory | None, Problem | None]:
    """The memory a state file holds; (None, None) when there is none (or it belongs to another
    directory), (None, Problem) when it cannot be used."""
    obj = f"state file {path}"
    ignored = ("ignored: files that do not parse now lose their objects, and names defined twice "
               "go to the file that sorts first")
    try:
        data = _read_regular(path, None)
    except (FileNotFoundError, NotADirectoryError):
        return None, None                        # never written yet
    except (OSError, _Skip) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        return None, Problem(obj, f"cannot read: {reason}; {ignored}")
    try:
        state = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        return None, Problem(obj, f"corrupt ({error}); {ignored}")
    if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
        return None, Problem(obj, f"not an lbctl manifest state; {ignored}")
    if state.get("version") != STATE_VERSION:
        return None, Problem(obj, f"version {state.get('version')!r} unknown (this lbctl writes "
                                  f"{STATE_VERSION}); {ignored}")
    if state.get("directory") != str(directory.absolute()):
        return None, None                        # another --manifests: nothing to remember
    files, owners, objects = state.get("files"), state.get("owners"), state.get("objects", {})
    if not (isinstance(files, dict) and isinstance(owners, dict)
            and all(isinstance(k, str) and isinstance(v, str) for d in (files, owners) for k, v in d.items())):
        return None, Problem(obj, f"corrupt (files and owners must map strings to strings); {ignored}")
    if not (isinstance(objects, dict) and all(
            isinstance(rel, str) and isinstance(objs, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in objs.items())
            for rel, objs in objects.items())):
        return None, Problem(obj, f"corrupt (objects must map files to objects to strings); {ignored}")
    return _Memory(
        last_good={directory / rel: text for rel, text in files.items()},
        owners={label: str(directory / rel) for label, rel in owners.items()},
        objects={directory / rel: dict(objs) for rel, objs in objects.items()},
    ), None


def _write_state(path: Path, directory: Path, memory: _Memory) -> Problem | None:
    """Write the memory atomically: a reader (a restarted agent) sees the old or the new file."""
    # a few files own thousands of names: each origin made relative once
    relative = {origin: _relative(Path(origin), directory) for origin in set(memory.owners.values())}
    state = {
        "kind": STATE_KIND,
        "version": STATE_VERSION,
        "directory": str(directory.absolute()),
        "files": {_relative(p, directory): text for p, text in sorted(memory.last_good.items())},
        "owners": {label: relative[origin] for label, origin in sorted(memory.owners.items())},
        "objects": {_relative(p, directory): dict(sorted(objs.items()))
                    for p, objs in sorted(memory.objects.items())},
    }
    # one line, so that json's C encoder writes it (indent= falls back to the Python one)
    data = json.dumps(state, ensure_ascii=False).encode("utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as error:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return Problem(f"state file {path}", f"cannot write: {error.strerror or error}; the last good "
                                             "objects of files that stop parsing will not survive a restart")
    return None


def _relative(path: Path, directory: Path) -> str:
    try:
        return str(path.relative_to(directory))
    except ValueError:
        return str(path)

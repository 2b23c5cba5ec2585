"""What every source shares: the ``Source`` interface, ``SourceUnavailable``, and the join of
parsed objects into one ``ClusterSnapshot``.

A source is polled; it answers with a new snapshot, ``None`` (nothing changed), or raises
``SourceUnavailable`` when it cannot be read at all. The last is never "no services": the
agent keeps what is programmed (or refuses to start) until the source is back.

The join applies the API server's one-object-per-name rule to sources that can hold a name
twice (files). When a name is defined twice, the copy that was programmed keeps it: a source
passes ``owners`` (object label -> origin that won last time) and gets the new winners back,
so that adding a file can never move a live service. Without a previous owner the first copy
in the source's order wins, so the outcome does not depend on anything but the input.
"""
from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lbctl.model.objects import ClusterSnapshot, EndpointSlice, Problem, Service


@typing.runtime_checkable
class Source(typing.Protocol):
    """Where cluster state comes from: manifests now, the Kubernetes API later.

    The agent calls ``poll()`` in its loop; it returns a whole new snapshot when anything
    changed and ``None`` otherwise, so the agent only computes and syncs when there is news.
    It raises ``SourceUnavailable`` when the source cannot be read at all.
    """

    def poll(self) -> ClusterSnapshot | None: ...


class SourceUnavailable(Exception):
    """The source cannot be read at all (a missing or unreadable directory, later an API
    server that cannot be reached). This means "nothing is known", never "no services":
    the caller keeps what is programmed, or refuses to start.

    ``source`` names it ("manifests directory /etc/lbctl/manifests"), ``reason`` says why
    ("does not exist", "permission denied", ...); ``str()`` is both.
    """

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One parsed EndpointSlice or Endpoints object and the slices it became."""

    label: str                          # "EndpointSlice default/web-abc", "Endpoints default/db"
    origin: str
    service_key: str
    slices: tuple[EndpointSlice, ...]


def build_snapshot(
    services: Iterable[Service],
    slices: Iterable[EndpointSlice],
    problems: Iterable[Problem] = (),
) -> ClusterSnapshot:
    """Join parsed objects into a snapshot: first of duplicates wins, orphan slices are reported.

    For sources other than manifests (tests, the future API source); the manifest source uses
    the same rules (``join``), with the owners it remembers.
    """
    records = [Record(f"EndpointSlice {s.key}", s.origin, s.service_key, (s,)) for s in slices]
    return join(list(services), records, list(problems))


def join(services: list[Service], records: list[Record], problems: list[Problem],
         owners: Mapping[str, str] | None = None,
         won: dict[str, str] | None = None) -> ClusterSnapshot:
    """One object per name; slices whose service is absent are reported but kept.

    ``owners`` maps an object label ("Service default/web") to the origin whose copy was
    programmed before: that copy keeps the name when it is still among the candidates. Every
    winner's origin is written into ``won`` (when given), for the caller to remember.
    """
    owners = owners or {}
    problems = list(problems)
    winners: dict[str, Service] = {}
    for service in services:
        label = f"Service {service.key}"
        first = winners.get(service.key)
        if first is None or (first.origin != owners.get(label) and service.origin == owners.get(label)):
            winners[service.key] = service
    for service in services:
        winner = winners[service.key]
        if service is not winner:
            problems.append(Problem(f"Service {service.key}",
                                    duplicate(winner.origin, service.origin, owners.get(f"Service {service.key}"))))
    record_winners: dict[str, Record] = {}
    for record in records:
        first_record = record_winners.get(record.label)
        owner = owners.get(record.label)
        if first_record is None or (first_record.origin != owner and record.origin == owner):
            record_winners[record.label] = record
    slices: dict[str, list[EndpointSlice]] = {}
    for record in records:
        winner_record = record_winners[record.label]
        if record is not winner_record:
            problems.append(Problem(record.label, duplicate(winner_record.origin, record.origin,
                                                            owners.get(record.label))))
            continue
        if record.service_key not in winners:
            problems.append(Problem(record.label, with_origin(
                f"Service {record.service_key} not found; kept, used once the service appears",
                record.origin)))
        if record.slices:
            slices.setdefault(record.service_key, []).extend(record.slices)
    if won is not None:
        won.update({f"Service {key}": s.origin for key, s in winners.items()})
        won.update({label: r.origin for label, r in record_winners.items()})
    return ClusterSnapshot(
        services=dict(sorted(winners.items())),
        slices={key: tuple(value) for key, value in sorted(slices.items())},
        problems=tuple(problems),
    )


def duplicate(kept: str, ignored: str, owner: str | None = None) -> str:
    """The message for a name defined twice: both places, which one is used, and the fix."""
    if kept == ignored:
        return (f"defined twice in {kept}; the first kept, the second ignored; "
                "remove or rename one of them")
    why = "it was programmed first" if owner == kept else "it comes first"
    return (f"defined twice, in {kept} and in {ignored}; the one in {kept} kept ({why}), "
            f"the other ignored; remove or rename one of them")


def with_origin(message: str, origin: str) -> str:
    return f"{message} ({origin})" if origin else message

"""An in-memory BPF map with BpfMap's interface, for control-plane tests without root."""
from __future__ import annotations

from collections.abc import Callable


class FakeMap:
    """An in-memory map with BpfMap's interface.

    ``log`` records this map's writes, ("update"|"delete", key), in order. A ``journal`` list
    shared by several maps records (map name, op, key) across all of them, so a test can check
    the order of writes *across* maps. ``after_write(map, op, key)`` runs after every single
    write (a batch is many writes), e.g. to check an invariant at each step.

    Failures for tests: ``fail_on`` holds (op, key) pairs that raise OSError; ``raise_on`` maps
    (op, key) to any exception to raise instead (a ValueError from a batch update, say).
    """

    def __init__(self, name: str = "fake", max_entries: int = 1 << 20, percpu: bool = False,
                 journal: list | None = None,
                 after_write: Callable[[FakeMap, str, bytes], None] | None = None):
        self.name = name
        self.max_entries = max_entries
        self.percpu = percpu
        self.data: dict[bytes, bytes] = {}
        self.log: list[tuple[str, bytes]] = []
        self.journal = journal
        self.after_write = after_write
        self.fail_on: set[tuple[str, bytes]] = set()
        self.raise_on: dict[tuple[str, bytes], BaseException] = {}

    def _fail(self, op: str, key: bytes) -> None:
        if (op, key) in self.raise_on:
            raise self.raise_on[(op, key)]
        if (op, key) in self.fail_on:
            raise OSError(28 if op == "update" else 5, f"injected failure: {op} in {self.name}")

    def _wrote(self, op: str, key: bytes) -> None:
        self.log.append((op, key))
        if self.journal is not None:
            self.journal.append((self.name, op, key))
        if self.after_write is not None:
            self.after_write(self, op, key)

    def lookup(self, key: bytes):
        value = self.data.get(key)
        return [value] if self.percpu and value is not None else value

    def update(self, key: bytes, value, flags: int = 0) -> None:
        self._fail("update", key)
        if key not in self.data and len(self.data) >= self.max_entries:
            raise OSError(7, f"{self.name} is full")
        self.data[key] = value[0] if isinstance(value, list) else value
        self._wrote("update", key)

    def delete(self, key: bytes) -> bool:
        self._fail("delete", key)
        found = self.data.pop(key, None) is not None
        self._wrote("delete", key)
        return found

    def update_batch(self, items) -> None:
        for key, value in items:
            self.update(key, value)

    def delete_batch(self, keys) -> int:
        return sum(self.delete(key) for key in keys)

    def items(self):
        for key, value in list(self.data.items()):
            yield key, [value] if self.percpu else value

    def keys(self):
        yield from list(self.data)

    def count(self) -> int:
        return len(self.data)

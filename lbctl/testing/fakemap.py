"""An in-memory BPF map with BpfMap's interface, for control-plane tests without root."""
from __future__ import annotations


class FakeMap:
    """An in-memory map with BpfMap's interface; `fail_on` injects a failure for tests."""

    def __init__(self, name: str = "fake", max_entries: int = 1 << 20, percpu: bool = False):
        self.name = name
        self.max_entries = max_entries
        self.percpu = percpu
        self.data: dict[bytes, bytes] = {}
        self.log: list[tuple[str, bytes]] = []   # ("update"|"delete", key), in order
        self.fail_on: set[tuple[str, bytes]] = set()

    def lookup(self, key: bytes):
        value = self.data.get(key)
        return [value] if self.percpu and value is not None else value

    def update(self, key: bytes, value, flags: int = 0) -> None:
        if ("update", key) in self.fail_on:
            raise OSError(28, f"injected failure updating {self.name}")
        if key not in self.data and len(self.data) >= self.max_entries:
            raise OSError(7, f"{self.name} is full")
        self.data[key] = value[0] if isinstance(value, list) else value
        self.log.append(("update", key))

    def delete(self, key: bytes) -> bool:
        if ("delete", key) in self.fail_on:
            raise OSError(5, f"injected failure deleting from {self.name}")
        self.log.append(("delete", key))
        return self.data.pop(key, None) is not None

    def update_batch(self, items) -> None:
        for key, value in items:
            self.update(key, value)

    def items(self):
        for key, value in list(self.data.items()):
            yield key, [value] if self.percpu else value

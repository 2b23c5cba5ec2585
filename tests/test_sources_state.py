"""What the manifest source remembers, across polls and across restarts (the state file): the
last good objects of a file that stops parsing, and which copy of a name defined twice is
programmed. No root needed."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lbctl.sources import manifests
from lbctl.sources.manifests import ManifestSource, load_manifests

SVC = "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
SLICE = """apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints: [{{addresses: [{address}]}}]
"""
BROKEN = "kind: Service\nmetadata: [\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def age(path: Path) -> None:
    """An hour old, so that the racy-mtime re-read does not apply."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 3600 * 10**9))


def cluster_ip(snapshot, key: str = "default/web") -> str:
    return snapshot.services[key].cluster_ips[0]


@pytest.fixture
def layout(tmp_path):
    """A manifests directory and a state path beside it, as /run/lbctl would hold it."""
    directory = tmp_path / "manifests"
    directory.mkdir()
    return directory, tmp_path / "run" / "lbctl" / "manifests.state"


# --- item 3: last good objects survive a restart ---------------------------------------------


def test_a_restart_while_a_file_does_not_parse_keeps_its_services(layout):
    directory, state = layout
    web = write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    write(directory / "other.yaml", SVC.format(name="other", ip="10.96.0.2"))
    first = ManifestSource(directory, state_path=state)
    assert sorted(first.poll().services) == ["default/other", "default/web"]
    assert state.is_file()

    web.write_text(BROKEN)                       # broken while the agent is down
    restarted = ManifestSource(directory, state_path=state)
    snapshot = restarted.poll()
    assert sorted(snapshot.services) == ["default/other", "default/web"]
    assert cluster_ip(snapshot) == "10.96.0.1"
    (problem,) = snapshot.problems
    assert problem.obj == f"file {web}"
    assert problem.message.startswith("malformed YAML")
    assert problem.message.endswith("keeping the 1 document(s) it last held until it is fixed")

    web.write_text(SVC.format(name="web", ip="10.96.0.9"))
    fixed = restarted.poll()
    assert cluster_ip(fixed) == "10.96.0.9" and fixed.problems == ()


def test_without_a_state_file_a_restart_forgets(layout):
    """The behaviour the state file exists for (and load_manifests keeps: it is stateless)."""
    directory, _ = layout
    web = write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    ManifestSource(directory).poll()
    web.write_text(BROKEN)
    assert ManifestSource(directory).poll().services == {}
    assert load_manifests(directory).services == {}


def test_the_state_is_written_when_it_changes_only(layout, monkeypatch):
    directory, state = layout
    web = write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    age(web)
    writes = []
    real = manifests._write_state
    monkeypatch.setattr(manifests, "_write_state", lambda *a: writes.append(1) or real(*a))
    source = ManifestSource(directory, state_path=state)
    source.poll()
    assert len(writes) == 1
    assert source.poll() is None and len(writes) == 1
    web.write_text(BROKEN)                       # no new good version: nothing to write
    age(web)
    source.poll()
    assert len(writes) == 1
    web.write_text(SVC.format(name="web", ip="10.96.0.7"))
    age(web)
    source.poll()
    assert len(writes) == 2
    assert ManifestSource(directory, state_path=state).poll().services["default/web"].cluster_ips == ("10.96.0.7",)


def test_the_state_is_written_atomically_and_names_files_relative_to_the_directory(layout, monkeypatch):
    directory, state = layout
    write(directory / "apps" / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    replaced = []
    real = os.replace
    monkeypatch.setattr(manifests.os, "replace", lambda a, b: replaced.append((Path(a), Path(b))) or real(a, b))
    ManifestSource(directory, state_path=state).poll()
    ((tmp, final),) = replaced
    assert final == state and tmp.parent == state.parent and tmp != state
    assert sorted(p.name for p in state.parent.iterdir()) == [state.name]   # no temporary left
    data = json.loads(state.read_text())
    assert data["directory"] == str(directory.absolute())
    assert data["files"] == {"apps/web.yaml": SVC.format(name="web", ip="10.96.0.1")}
    assert data["owners"] == {"Service default/web": "apps/web.yaml"}
    assert state.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("content, reason", [
    ("{not json", "corrupt"),
    ('["a list"]', "not an lbctl manifest state"),
    ('{"kind": "lbctl-manifest-source-state", "version": 99}', "version 99 unknown"),
    ('{"kind": "lbctl-manifest-source-state", "version": 1, "directory": "%s", "files": [], "owners": {}}',
     "corrupt (files and owners must map strings to strings)"),
    (b"\xff\xfe garbage", "corrupt"),
])
def test_a_corrupt_state_file_is_reported_and_ignored(layout, content, reason):
    directory, state = layout
    write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    state.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        state.write_bytes(content)
    else:
        state.write_text(content.replace("%s", str(directory.absolute())))
    source = ManifestSource(directory, state_path=state)
    snapshot = source.poll()
    assert list(snapshot.services) == ["default/web"]
    (problem,) = snapshot.problems
    assert problem.obj == f"state file {state}"
    assert problem.message.startswith(reason), problem.message
    assert problem.message.endswith("ignored: files that do not parse now lose their objects, and names "
                                    "defined twice go to the file that sorts first")
    assert json.loads(state.read_text())["files"] == {"web.yaml": SVC.format(name="web", ip="10.96.0.1")}


def test_an_unreadable_state_file_is_reported_and_ignored(layout):
    directory, state = layout
    write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    state.mkdir(parents=True)                    # a directory where the file should be
    snapshot = ManifestSource(directory, state_path=state).poll()
    assert list(snapshot.services) == ["default/web"]
    messages = {p.obj: p.message for p in snapshot.problems}
    assert messages[f"state file {state}"].startswith("cannot")
    assert len(messages) == 1


def test_a_state_file_that_cannot_be_written_is_reported_not_fatal(layout, monkeypatch):
    directory, state = layout
    write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    state.parent.parent.mkdir()
    state.parent.write_text("a file where the directory should be")
    source = ManifestSource(directory, state_path=state)
    snapshot = source.poll()
    assert list(snapshot.services) == ["default/web"]
    (problem,) = snapshot.problems
    assert problem.obj == f"state file {state}"
    assert problem.message.startswith("cannot write: ")
    assert problem.message.endswith("the last good objects of files that stop parsing will not survive a restart")
    state.parent.unlink()                        # fixed: the next poll writes it
    source.poll()
    assert json.loads(state.read_text())["files"] == {"web.yaml": SVC.format(name="web", ip="10.96.0.1")}


def test_a_state_of_another_directory_is_ignored_silently(layout, tmp_path):
    directory, state = layout
    other = tmp_path / "other"
    write(other / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    ManifestSource(other, state_path=state).poll()
    (directory / "web.yaml").write_text(BROKEN)
    snapshot = ManifestSource(directory, state_path=state).poll()
    assert snapshot.services == {}
    assert [p.obj for p in snapshot.problems] == [f"file {directory / 'web.yaml'}"]


def test_a_relative_directory_survives_a_change_of_working_directory(layout, monkeypatch, tmp_path):
    directory, state = layout
    web = write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    monkeypatch.chdir(tmp_path)
    ManifestSource("manifests", state_path=state).poll()
    web.write_text(BROKEN)
    monkeypatch.chdir(directory)
    snapshot = ManifestSource(directory, state_path=state).poll()
    assert list(snapshot.services) == ["default/web"]


# --- item 4: a name defined twice stays with the copy that is programmed --------------------


def test_adding_a_file_never_moves_a_live_service(layout):
    directory, _ = layout
    write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    source = ManifestSource(directory)
    assert cluster_ip(source.poll()) == "10.96.0.1"
    intruder = write(directory / "a-new.yaml", SVC.format(name="web", ip="10.96.0.66"))   # sorts first
    snapshot = source.poll()
    assert cluster_ip(snapshot) == "10.96.0.1"
    (problem,) = snapshot.problems
    assert problem.obj == "Service default/web"
    assert problem.message == (
        f"defined twice, in {directory / 'web.yaml'} and in {intruder}; the one in {directory / 'web.yaml'} "
        "kept (it was programmed first), the other ignored; remove or rename one of them")
    assert cluster_ip(source.poll() or snapshot) == "10.96.0.1"          # and on later polls
    (directory / "web.yaml").unlink()                                    # the owner's file goes:
    assert cluster_ip(source.poll()) == "10.96.0.66"                     # the only copy left wins


def test_a_restart_keeps_the_programmed_copy(layout):
    directory, state = layout
    write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    ManifestSource(directory, state_path=state).poll()
    write(directory / "a-new.yaml", SVC.format(name="web", ip="10.96.0.66"))   # added while down
    snapshot = ManifestSource(directory, state_path=state).poll()
    assert cluster_ip(snapshot) == "10.96.0.1"
    assert [p.obj for p in snapshot.problems] == ["Service default/web"]
    assert "(it was programmed first)" in snapshot.problems[0].message
    again = ManifestSource(directory, state_path=state).poll()            # and the next restart
    assert cluster_ip(again) == "10.96.0.1"


def test_at_the_first_read_the_file_that_sorts_first_wins(layout):
    directory, _ = layout
    write(directory / "b.yaml", SVC.format(name="web", ip="10.96.0.2"))
    write(directory / "a.yaml", SVC.format(name="web", ip="10.96.0.1"))
    snapshot = ManifestSource(directory).poll()
    assert cluster_ip(snapshot) == "10.96.0.1"
    assert "kept (it comes first)" in snapshot.problems[0].message


def test_an_endpoint_slice_defined_twice_stays_with_the_programmed_copy(layout):
    directory, state = layout
    write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1") + "---\n"
          + SLICE.format(name="web-1", service="web", address="10.244.0.1"))
    source = ManifestSource(directory, state_path=state)

    def addresses(snapshot):
        return [e.addresses[0] for s in snapshot.slices["default/web"] for e in s.endpoints]

    assert addresses(source.poll()) == ["10.244.0.1"]
    intruder = write(directory / "a.yaml", SLICE.format(name="web-1", service="web", address="10.244.0.66"))
    snapshot = source.poll()
    assert addresses(snapshot) == ["10.244.0.1"]
    (problem,) = snapshot.problems
    assert problem.obj == "EndpointSlice default/web-1"
    assert str(directory / "web.yaml") in problem.message and str(intruder) in problem.message
    assert "(it was programmed first)" in problem.message and "remove or rename one of them" in problem.message
    assert addresses(ManifestSource(directory, state_path=state).poll()) == ["10.244.0.1"]


def test_a_copy_that_becomes_invalid_keeps_its_last_valid_version_and_the_name(layout):
    """An invalid update is refused, as by the API server: the programmed copy stays (its last
    valid version), so the other copy of the name never takes over."""
    directory, _ = layout
    web = write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    other = write(directory / "z.yaml", SVC.format(name="web", ip="10.96.0.2"))
    source = ManifestSource(directory)
    assert cluster_ip(source.poll()) == "10.96.0.1"
    web.write_text(SVC.format(name="web", ip="10.96.0.300"))             # parses, invalid object
    snapshot = source.poll()
    assert cluster_ip(snapshot) == "10.96.0.1"
    messages = [p.message for p in snapshot.problems if p.obj == "Service default/web"]
    assert any(str(other) in m and "(it was programmed first)" in m for m in messages)
    web.write_text(SVC.format(name="web", ip="10.96.0.1"))
    assert cluster_ip(source.poll()) == "10.96.0.1"


# --- an object that becomes invalid keeps its last valid version ------------------------------


def test_an_object_that_becomes_invalid_keeps_its_last_valid_version(layout):
    directory, _ = layout
    web = write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1") + "---\n"
                + SVC.format(name="db", ip="10.96.0.2"))
    source = ManifestSource(directory)
    assert sorted(source.poll().services) == ["default/db", "default/web"]
    web.write_text(SVC.format(name="web", ip="10.96.0.1").replace("port: 80", "port: 99999") + "---\n"
                   + SVC.format(name="db", ip="10.96.0.3"))
    snapshot = source.poll()
    assert snapshot.services["default/web"].ports[0].port == 80        # the previous version
    assert cluster_ip(snapshot, "default/db") == "10.96.0.3"            # the valid update applies
    (problem,) = snapshot.problems
    assert problem.obj == "Service default/web"
    assert str(web) in problem.message and "99999" in problem.message
    assert problem.message.endswith("the previous valid version stays programmed until it is fixed")
    assert "service skipped" not in problem.message

    web.write_text(SVC.format(name="web", ip="10.96.0.9") + "---\n" + SVC.format(name="db", ip="10.96.0.3"))
    fixed = source.poll()
    assert cluster_ip(fixed) == "10.96.0.9" and fixed.problems == ()


def test_an_invalid_object_in_a_file_that_then_stops_parsing_keeps_its_last_valid_version(layout):
    directory, _ = layout
    web = write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    source = ManifestSource(directory)
    source.poll()
    web.write_text(SVC.format(name="web", ip="10.96.0.300"))
    assert cluster_ip(source.poll()) == "10.96.0.1"
    web.write_text(BROKEN)                       # the last good text holds the invalid version
    snapshot = source.poll()
    assert cluster_ip(snapshot) == "10.96.0.1"
    assert {p.obj for p in snapshot.problems} == {f"file {web}", "Service default/web"}


def test_a_restart_keeps_the_last_valid_version_of_an_invalid_object(layout):
    directory, state = layout
    web = write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    ManifestSource(directory, state_path=state).poll()
    web.write_text(SVC.format(name="web", ip="10.96.0.300"))             # while the agent is down
    snapshot = ManifestSource(directory, state_path=state).poll()
    assert cluster_ip(snapshot) == "10.96.0.1"
    assert [p.obj for p in snapshot.problems] == ["Service default/web"]
    assert ManifestSource(directory, state_path=state).poll().services["default/web"].cluster_ips == ("10.96.0.1",)


@pytest.mark.parametrize("state_file", [False, True])
def test_an_object_removed_from_its_file_or_a_file_deleted_is_removed(layout, state_file):
    """Only an object still present but invalid keeps its last valid version."""
    directory, state = layout
    web = write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1") + "---\n"
                + SVC.format(name="db", ip="10.96.0.2"))
    source = ManifestSource(directory, state_path=state if state_file else None)
    source.poll()
    web.write_text(SVC.format(name="web", ip="10.96.0.300"))             # db removed, web invalid
    assert sorted(source.poll().services) == ["default/web"]
    web.write_text(SVC.format(name="db", ip="10.96.0.2"))                # web removed too
    assert sorted(source.poll().services) == ["default/db"]
    web.write_text(SVC.format(name="web", ip="10.96.0.300"))             # back, never valid since
    assert sorted(source.poll().services) == []
    web.write_text(SVC.format(name="web", ip="10.96.0.1"))
    source.poll()
    web.unlink()
    assert source.poll().services == {}
    write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.300"))   # a new file
    assert source.poll().services == {}
    if state_file:
        assert json.loads(state.read_text())["objects"] == {}


# --- the state file deleted behind the agent's back ------------------------------------------


def test_a_state_file_deleted_while_running_is_written_again(layout):
    """lbctl cleanup --force may delete it: the next poll writes it back, changes or not."""
    directory, state = layout
    web = write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    age(web)
    source = ManifestSource(directory, state_path=state)
    source.poll()
    state.unlink()
    assert source.poll() is None
    assert json.loads(state.read_text())["files"] == {"web.yaml": SVC.format(name="web", ip="10.96.0.1")}

"""The manifest source and the file system: what it reads, what it skips and says so, and that
a directory it cannot read is "unavailable", never "no services". No root needed."""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lbctl.sources import manifests
from lbctl.sources.base import SourceUnavailable
from lbctl.sources.manifests import ManifestSource, load_manifests

SVC = "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def web(directory: Path) -> Path:
    return write(directory / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))


def problems_of(snapshot) -> dict[str, str]:
    return {p.obj: p.message for p in snapshot.problems}


def failing_scandir(monkeypatch, target: Path, error: OSError) -> None:
    """os.scandir raises ``error`` for ``target`` (root reads everything, so permissions
    cannot be tested with chmod)."""
    real = os.scandir

    def scandir(path="."):
        if Path(path) == target:
            raise error
        return real(path)

    monkeypatch.setattr(manifests.os, "scandir", scandir)


def counted_reads(monkeypatch) -> list[int]:
    """The number of bytes each os.read of the source returned."""
    reads: list[int] = []
    real = os.read

    def read(fd, n):
        data = real(fd, n)
        reads.append(len(data))
        return data

    monkeypatch.setattr(manifests.os, "read", read)
    return reads


@contextlib.contextmanager
def fifo_writers(fifo: Path):
    """open() of a FIFO without a writer blocks forever. This thread lets every reader that
    does open ``fifo`` go on (it then reads an empty file), so that a source that opens FIFOs
    fails a test instead of hanging it."""
    stop = threading.Event()

    def writers():
        while not stop.is_set():
            open(fifo, "wb").close()             # blocks until some reader opens the FIFO

    writer = threading.Thread(target=writers, daemon=True)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        while writer.is_alive():                 # release the writer waiting for a reader
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
            writer.join(0.01)


# --- item 1: a directory that cannot be read is unavailable, not empty ----------------------


@pytest.mark.parametrize("make, reason", [
    (lambda d: None, "does not exist"),
    (lambda d: d.write_text("not a directory"), "is not a directory"),
    (lambda d: d.parent.joinpath("elsewhere").mkdir() or d.symlink_to(d.parent / "gone"), "does not exist"),
])
def test_unreadable_directory_raises_source_unavailable(tmp_path, make, reason):
    directory = tmp_path / "manifestz"
    make(directory)
    with pytest.raises(SourceUnavailable) as raised:
        ManifestSource(directory).poll()
    assert raised.value.source == f"manifests directory {directory}"
    assert raised.value.reason == reason
    assert str(raised.value) == f"manifests directory {directory}: {reason}"
    with pytest.raises(SourceUnavailable):
        load_manifests(directory)


@pytest.mark.parametrize("error, reason", [
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied (cannot list it)"),
    (OSError(errno.EIO, "Input/output error"), "cannot list it: Input/output error"),
])
def test_directory_that_cannot_be_listed_raises(tmp_path, monkeypatch, error, reason):
    web(tmp_path)
    failing_scandir(monkeypatch, tmp_path, error)
    with pytest.raises(SourceUnavailable) as raised:
        ManifestSource(tmp_path).poll()
    assert raised.value.reason == reason
    with pytest.raises(SourceUnavailable, match="cannot list it"):
        load_manifests(tmp_path)


def test_directory_that_cannot_be_stat_ed_raises(tmp_path, monkeypatch):
    real = os.stat

    def stat(path, *args, **kwargs):
        if Path(path) == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(manifests.os, "stat", stat)
    with pytest.raises(SourceUnavailable, match=r": permission denied$"):
        ManifestSource(tmp_path).poll()


def test_a_directory_that_vanishes_later_raises_and_never_gives_an_empty_snapshot(tmp_path):
    directory = tmp_path / "manifests"
    web(directory)
    source = ManifestSource(directory)
    assert list(source.poll().services) == ["default/web"]
    moved = directory.rename(tmp_path / "moved")
    with pytest.raises(SourceUnavailable, match="does not exist"):
        source.poll()
    moved.rename(directory)
    assert source.poll() is None                 # back as it was: nothing new to program


def test_a_subdirectory_that_cannot_be_listed_is_a_problem_and_the_rest_is_read(tmp_path, monkeypatch):
    web(tmp_path)
    locked = tmp_path / "locked"
    write(locked / "db.yaml", SVC.format(name="db", ip="10.96.0.2"))
    failing_scandir(monkeypatch, locked, PermissionError(errno.EACCES, "Permission denied"))
    snapshot = ManifestSource(tmp_path).poll()
    assert list(snapshot.services) == ["default/web"]
    assert problems_of(snapshot) == {
        f"directory {locked}": "cannot list: Permission denied; its manifests skipped, others loaded"}


def test_the_files_of_a_subdirectory_that_cannot_be_listed_keep_their_objects(tmp_path, monkeypatch):
    web(tmp_path)
    locked = tmp_path / "locked"
    db = write(locked / "db.yaml", SVC.format(name="db", ip="10.96.0.2"))
    source = ManifestSource(tmp_path)
    assert sorted(source.poll().services) == ["default/db", "default/web"]
    with monkeypatch.context() as patch:
        failing_scandir(patch, locked, PermissionError(errno.EACCES, "Permission denied"))
        snapshot = source.poll()
        assert sorted(snapshot.services) == ["default/db", "default/web"]
        assert problems_of(snapshot)[f"file {db}"] == ("in a directory that cannot be listed; keeping the "
                                                       "1 document(s) it last held until it is fixed")
        assert f"directory {locked}" in problems_of(snapshot)
        assert source.poll() is None             # and stays so
    db.write_text(SVC.format(name="db", ip="10.96.0.3"))                # listed again: read again
    snapshot = source.poll()
    assert snapshot.services["default/db"].cluster_ips == ("10.96.0.3",) and snapshot.problems == ()
    db.unlink()
    assert sorted(source.poll().services) == ["default/web"]


def test_a_file_dated_in_the_future_is_not_racy(tmp_path):
    """Racy only within the window on both sides of now: a far-future mtime would otherwise
    make every poll re-read the directory; a write now changes its mtime anyway."""
    path = web(tmp_path)
    now = manifests.time.time_ns()
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, now + 3600 * 10**9))            # an hour ahead
    source = ManifestSource(tmp_path)
    source.poll()
    assert not source._racy
    os.utime(path, ns=(st.st_atime_ns, now + manifests.RACY_WINDOW_NS // 2))   # within the window
    source.poll()
    assert source._racy
    entry = manifests._Entry(path, (now + manifests.RACY_WINDOW_NS + 1, 1, 1, 1), None)
    assert not manifests._is_racy([entry], now)
    assert manifests._is_racy([entry._replace(state=(now - manifests.RACY_WINDOW_NS, 1, 1, 1))], now)


def test_render_names_an_unreadable_directory(tmp_path, monkeypatch, capsys):
    """`lbctl render` exits 1 with one line, not a traceback and not an empty ruleset."""
    from lbctl.cli import main as cli

    web(tmp_path)
    failing_scandir(monkeypatch, tmp_path, PermissionError(errno.EACCES, "Permission denied"))
    rc = cli.main(["render", "iptables", "--manifests", str(tmp_path), "--node-name", "n",
                   "--node-ip", "192.0.2.2", "--no-random-fully", "--no-nfacct", "--no-tcp-be-liberal"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert f"--manifests {tmp_path}: permission denied (cannot list it)" in err
    assert "Traceback" not in err


def test_bench_names_missing_lab_manifests(tmp_path):
    from types import SimpleNamespace

    from lbctl.bench import modes

    with pytest.raises(modes.BenchError, match="does not exist"):
        modes.real_ports(SimpleNamespace(manifests_dir=tmp_path / "gone"))


# --- item 2: only regular files, never blocking, never unbounded ----------------------------


def test_a_fifo_named_like_a_manifest_is_skipped_without_blocking(tmp_path):
    web(tmp_path)
    fifo = tmp_path / "x.yaml"
    os.mkfifo(fifo)
    with fifo_writers(fifo):
        for snapshot in (load_manifests(tmp_path), ManifestSource(tmp_path).poll()):
            assert list(snapshot.services) == ["default/web"]
            assert problems_of(snapshot) == {
                f"file {fifo}": "is a FIFO (named pipe), not a regular file; file skipped, others loaded"}


def test_a_fifo_swapped_in_after_the_listing_is_caught_by_fstat(tmp_path, monkeypatch):
    """The listing saw a regular file; by the time it is opened it is a FIFO: the
    non-blocking open succeeds and fstat refuses it."""
    path = web(tmp_path)
    real = manifests._read_regular

    def swap_then_read(target, limit):
        if target == path:
            path.unlink()
            os.mkfifo(path)
        return real(target, limit)

    monkeypatch.setattr(manifests, "_read_regular", swap_then_read)
    snapshot = load_manifests(tmp_path)
    assert snapshot.services == {}
    assert problems_of(snapshot) == {
        f"file {path}": "is a FIFO (named pipe), not a regular file; file skipped, others loaded"}


def test_a_link_to_dev_zero_is_skipped_and_memory_stays_bounded(tmp_path):
    """Reading /dev/zero never ends. The load runs in a child limited to 1 GiB of address
    space, so a source that reads it fails (MemoryError) instead of eating the machine."""
    web(tmp_path)
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    (tmp_path / "null.yaml").symlink_to("/dev/null")
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from lbctl.sources.manifests import load_manifests\n"
        "snapshot = load_manifests(sys.argv[1])\n"
        "print(sorted(snapshot.services))\n"
        "for p in snapshot.problems: print(p)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "['default/web']",
        f"file {tmp_path / 'null.yaml'}: is a character device, not a regular file; file skipped, others loaded",
        f"file {tmp_path / 'zero.yaml'}: is a character device, not a regular file; file skipped, others loaded",
    ]


def test_a_socket_named_like_a_manifest_is_skipped(tmp_path):
    web(tmp_path)
    path = tmp_path / "s.yaml"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        snapshot = load_manifests(tmp_path)
    assert list(snapshot.services) == ["default/web"]
    assert problems_of(snapshot) == {
        f"file {path}": "is a socket, not a regular file; file skipped, others loaded"}


def test_a_broken_link_is_reported(tmp_path):
    web(tmp_path)
    (tmp_path / "gone.yaml").symlink_to("missing/target.yaml")
    (tmp_path / "loop.yaml").symlink_to("loop.yaml")
    snapshot = load_manifests(tmp_path)
    assert list(snapshot.services) == ["default/web"]
    assert problems_of(snapshot) == {
        f"file {tmp_path / 'gone.yaml'}": "is a broken symbolic link (to missing/target.yaml: No such file "
                                          "or directory); file skipped, others loaded",
        f"file {tmp_path / 'loop.yaml'}": "is a broken symbolic link (to loop.yaml: Too many levels of "
                                          "symbolic links); file skipped, others loaded",
    }


def test_a_directory_named_like_a_manifest_is_reported_not_read(tmp_path):
    """What a bind mount of a missing file leaves behind; its content is not read."""
    web(tmp_path)
    write(tmp_path / "x.yaml" / "db.yaml", SVC.format(name="db", ip="10.96.0.2"))
    snapshot = load_manifests(tmp_path)
    assert list(snapshot.services) == ["default/web"]
    assert problems_of(snapshot) == {
        f"file {tmp_path / 'x.yaml'}": "is a directory named like a manifest file; not read (rename it "
                                       "if it holds manifests), others loaded"}


def test_subdirectories_are_read_but_links_to_directories_are_not_followed(tmp_path):
    """The documented choice: real subdirectories are read recursively; a link to a directory
    (which could loop back) is reported and not followed."""
    web(tmp_path)
    write(tmp_path / "apps" / "deep" / "db.yaml", SVC.format(name="db", ip="10.96.0.2"))
    write(tmp_path.parent / f"{tmp_path.name}-other" / "x.yaml", SVC.format(name="x", ip="10.96.0.3"))
    (tmp_path / "linked").symlink_to(tmp_path.parent / f"{tmp_path.name}-other")
    (tmp_path / "apps" / "up").symlink_to(tmp_path)
    snapshot = load_manifests(tmp_path)
    assert list(snapshot.services) == ["default/db", "default/web"]
    assert problems_of(snapshot) == {
        f"directory {tmp_path / 'apps' / 'up'}": "is a symbolic link to a directory, not followed (links "
                                                 "can loop); its manifests skipped, others loaded",
        f"directory {tmp_path / 'linked'}": "is a symbolic link to a directory, not followed (links can "
                                            "loop); its manifests skipped, others loaded",
    }


def test_links_to_regular_files_are_followed_as_in_a_configmap_volume(tmp_path):
    """A ConfigMap volume: name.yaml -> ..data/name.yaml, ..data -> ..2024_01_01_00_00_00.1;
    the hidden entries are not read twice, nor reported."""
    stamp = tmp_path / "..2024_01_01_00_00_00.1"
    write(stamp / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    (tmp_path / "..data").symlink_to(stamp.name)
    (tmp_path / "web.yaml").symlink_to("..data/web.yaml")
    snapshot = load_manifests(tmp_path)
    assert list(snapshot.services) == ["default/web"] and snapshot.problems == ()
    assert snapshot.services["default/web"].origin == str(tmp_path / "web.yaml")


def test_a_huge_sparse_file_is_refused_without_being_read(tmp_path, monkeypatch):
    web(tmp_path)
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(1 << 40)                      # 1 TiB, no block allocated
    reads = counted_reads(monkeypatch)
    snapshot = load_manifests(tmp_path)
    assert list(snapshot.services) == ["default/web"]
    assert problems_of(snapshot) == {f"file {huge}": "larger than 64 MiB; file skipped, others loaded"}
    assert sum(reads) == len(SVC.format(name="web", ip="10.96.0.1"))   # web.yaml only


def test_the_size_cap_does_not_trust_st_size(tmp_path, monkeypatch):
    """procfs files are regular files of st_size 0; reading stops at the cap plus one byte."""
    web(tmp_path)
    (tmp_path / "maps.yaml").symlink_to("/proc/self/maps")
    assert os.stat(tmp_path / "maps.yaml").st_size == 0
    monkeypatch.setattr(manifests, "MAX_FILE_BYTES", 200)
    reads = counted_reads(monkeypatch)
    snapshot = load_manifests(tmp_path)
    assert list(snapshot.services) == ["default/web"]
    assert problems_of(snapshot) == {
        f"file {tmp_path / 'maps.yaml'}": "larger than 200 bytes; file skipped, others loaded"}
    assert sum(reads) <= len(SVC.format(name="web", ip="10.96.0.1")) + 201


def test_files_are_opened_non_blocking_and_without_a_controlling_tty(tmp_path, monkeypatch):
    path = web(tmp_path)
    flags = []
    real_open = os.open
    monkeypatch.setattr(manifests.os, "open", lambda p, f, *a: flags.append((Path(p), f)) or real_open(p, f, *a))
    load_manifests(tmp_path)
    ((opened, flag),) = flags
    assert opened == path
    assert flag & os.O_NONBLOCK and flag & os.O_NOCTTY and flag & os.O_ACCMODE == os.O_RDONLY


def test_a_special_file_that_replaces_a_good_one_keeps_its_last_good_objects(tmp_path):
    """The name is still there but cannot be read: like a parse error, not like a deletion."""
    path = web(tmp_path)
    source = ManifestSource(tmp_path)
    assert list(source.poll().services) == ["default/web"]
    path.unlink()
    os.mkfifo(path)
    with fifo_writers(path):
        snapshot = source.poll()
    assert list(snapshot.services) == ["default/web"]
    assert problems_of(snapshot) == {
        f"file {path}": "is a FIFO (named pipe), not a regular file; keeping the 1 document(s) it last "
                        "held until it is fixed"}
    path.unlink()
    assert source.poll().services == {}          # gone: its objects go with it

"""Python (cffi reading bpf/lbctl_shared.h) and the compiled BPF program agree on every struct.

The BPF side is measured by compiling a program that stores sizeof/offsetof of every field
into an array map (with the same bcc, target and flags as the datapath), running it once
through BPF_PROG_TEST_RUN, and reading the numbers back."""
from __future__ import annotations

import pytest

from lbctl.datapath.ebpf import bpfsys, shared
from lbctl.datapath.ebpf.packets import frame


def _layout_items():
    items = []
    for struct in shared.STRUCTS:
        items.append((struct, None, shared.sizeof(struct)))
        for name in shared.fields(struct):
            items.append((struct, name, shared.offsetof(struct, name)))
    return items


def test_python_view_is_plain_fixed_width():
    """The cffi view knows every struct and no field has a platform-dependent type."""
    for struct in shared.STRUCTS:
        for name, f in shared.ffi.typeof(f"struct {struct}").fields:
            kind = f.type.item.cname if f.type.kind == "array" else f.type.cname
            assert kind in {"uint8_t", "uint16_t", "uint32_t", "uint64_t"}, (struct, name, kind)


def test_key_converters_put_network_order_in_be_fields():
    key = shared.service_key("10.96.0.10", 80, 6, slot=2)
    assert key[:4] == bytes([10, 96, 0, 10]) and key[4:6] == bytes([0, 80])
    assert int.from_bytes(key[6:8], "little") == 2 and key[8] == 6


@pytest.mark.root
def test_compiled_program_agrees_with_python(loaded_datapath):
    from bcc import BPF

    items = _layout_items()
    body = []
    for i, (struct, field, _) in enumerate(items):
        expr = f"sizeof(struct {struct})" if field is None else f"offsetof(struct {struct}, {field})"
        body.append(f"{{ u32 k = {i}; u64 v = {expr}; layout.update(&k, &v); }}")
    text = (
        "#include <uapi/linux/bpf.h>\n#include <linux/stddef.h>\n#include \"lbctl_shared.h\"\n"
        f"BPF_ARRAY(layout, u64, {len(items)});\n"
        "int measure(struct __sk_buff *skb) {\n" + "\n".join(body) + "\nreturn 0; }\n")
    b = BPF(text=text.encode(), cflags=[f"-I{shared.BPF_DIR / 'include'}"])
    try:
        fn = b.load_func(b"measure", BPF.SCHED_CLS)
        bpfsys.prog_test_run(fn.fd, frame("10.0.0.1", "10.0.0.2", 1, 2))
        table = b[b"layout"]
        compiled = {i: table[table.Key(i)].value for i in range(len(items))}
    finally:
        b.cleanup()
    mismatches = [(s, f, py, compiled[i]) for i, (s, f, py) in enumerate(items) if compiled[i] != py]
    assert not mismatches, mismatches


@pytest.mark.root
def test_pinned_maps_have_the_shared_sizes(loaded_datapath):
    for name, want in loaded_datapath.cfg.expected_maps().items():
        info = loaded_datapath.maps[name].info
        assert (info.type, info.key_size, info.value_size, info.max_entries) == want, name


@pytest.mark.root
def test_a_pinned_map_of_another_type_is_refused(tmp_path):
    """An agent must not adopt a pin that merely has the right sizes: a plain hash as lb4_ct
    would never evict, and conntrack would fill up."""
    import ctypes
    import os

    from conftest import config_for_tests

    from lbctl.datapath.ebpf import loader as ebpf

    cfg = config_for_tests(pin_dir=f"/sys/fs/bpf/lbctl-test-type-{os.getpid()}")
    os.makedirs(cfg.pin_dir)
    try:
        libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
        libbpf.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32,
                                          ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]
        _, key, value, entries = cfg.expected_maps()["lb4_ct"]
        fd = libbpf.bpf_map_create(bpfsys.MAP_TYPE_HASH, b"lb4_ct", key, value, entries, None)
        assert fd >= 0
        bpfsys.obj_pin(fd, os.path.join(cfg.pin_dir, "lb4_ct"))
        os.close(fd)
        with pytest.raises(ebpf.DatapathError, match="lb4_ct has type/key/value/entries 1/"):
            ebpf.check_pins(cfg)
    finally:
        ebpf.remove_pins(cfg.pin_dir)


def test_the_program_text_inlines_lbctl_headers_once_and_names_them():
    """bcc rewrites map calls only in the text it is given, so the loader hands it the program
    with bpf/'s own headers inlined (lbctl.datapath.ebpf.source); system headers stay includes,
    and #line markers keep messages naming the real files."""
    from lbctl.datapath.ebpf import source

    text = source.program_text(shared.BPF_DIR / "prog" / "lbctl_tc.c").decode()
    assert '#include "' not in text
    assert "#include <uapi/linux/bpf.h>" in text
    for header in ("include/lbctl_shared.h", "include/lbctl_maps.h", "lib/ctx/skb.h", "lib/parse.h",
                   "lib/csum.h", "lib/nat.h", "lib/conntrack.h", "lib/reject.h", "lib/stats.h", "lib/lb.h"):
        path = (shared.BPF_DIR / header).resolve()
        assert text.count(f'#line 1 "{path}"') == 1, header
    assert text.count("#ifndef LBCTL_SHARED_H") == 1


def test_the_bpf_tree_shows_the_architecture():
    """include/ the shared types and maps, lib/ the library (one concern a file, the context
    wrappers beside it), prog/ the programs; the tc and XDP programs are only their entry
    points, over the same library."""
    from lbctl.datapath.ebpf import source

    files = {str(p.relative_to(shared.BPF_DIR)) for p in shared.BPF_DIR.rglob("*") if p.is_file()}
    assert {"include/lbctl_shared.h", "include/lbctl_maps.h", "lib/parse.h", "lib/csum.h", "lib/nat.h",
            "lib/conntrack.h", "lib/reject.h", "lib/ctx/skb.h", "lib/ctx/xdp.h", "lib/mark.h",
            "prog/lbctl_tc.c", "prog/lbctl_xdp.c"} <= files
    for name in ("lbctl_tc.c", "lbctl_xdp.c"):
        program = (shared.BPF_DIR / "prog" / name).read_text()
        assert program.count("static ") == 0, f"{name}: helpers belong in lib/"
    xdp = source.program_text(shared.BPF_DIR / "prog" / "lbctl_xdp.c").decode()
    assert '#line 1 "' + str((shared.BPF_DIR / "lib/ctx/xdp.h").resolve()) + '"' in xdp
    assert "lib/ctx/skb.h" not in xdp, "one context per program"

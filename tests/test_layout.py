"""Python (cffi reading bpf/lbctl_shared.h) and the compiled BPF program agree on every struct.

The BPF side is measured by compiling a program that stores sizeof/offsetof of every field
into an array map (with the same bcc, target and flags as the datapath), running it once
through BPF_PROG_TEST_RUN, and reading the numbers back."""
from __future__ import annotations

import pytest

from lbctl import bpfsys, shared
from lbctl.packets import frame


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
    b = BPF(text=text.encode(), cflags=[f"-I{shared.BPF_DIR}"])
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
    for name, (key, value, entries) in loaded_datapath.cfg.expected_maps().items():
        info = loaded_datapath.maps[name].info
        assert (info.key_size, info.value_size, info.max_entries) == (key, value, entries), name

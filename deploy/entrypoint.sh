#!/bin/sh
# The image's entrypoint: choose the kernel headers bcc compiles the BPF programs against, then
# exec the command (lbctl run ...).
#
# bcc reads /lib/modules/$(uname -r)/build (the node's, mounted read-only), unless
# BCC_KERNEL_SOURCE names another tree. A node with its headers installed (the linux-headers
# package of its running kernel, reached through /lib/modules and /usr/src) uses them. A node
# without them (every kind node: kind mounts /lib/modules into its nodes but not /usr/src) uses
# the tree shipped in the image: Debian's linux-headers-amd64 merged into one directory. lbctl's
# programs touch no kernel-internal structure (tc/XDP context, UAPI headers, BPF helpers), so
# headers of another kernel version compile them correctly; lbctl's own CI does exactly this
# (Debian 6.1 headers on a newer kernel).
set -eu
kver=$(uname -r)
modules=${LBCTL_MODULES_DIR:-/lib/modules}                 # the node's (tests point these
shipped=${LBCTL_SHIPPED_HEADERS:-/opt/lbctl/kernel-headers} # at directories of their own)
if [ -n "${BCC_KERNEL_SOURCE:-}" ]; then
    echo "lbctl-entrypoint: kernel headers: BCC_KERNEL_SOURCE=$BCC_KERNEL_SOURCE (given)" >&2
elif [ -e "$modules/$kver/build/include/generated/autoconf.h" ]; then
    echo "lbctl-entrypoint: kernel headers: the node's, $modules/$kver/build" >&2
elif [ -e "$shipped/include/generated/autoconf.h" ]; then
    export BCC_KERNEL_SOURCE="$shipped"
    echo "lbctl-entrypoint: kernel headers: the node has none for $kver; using the image's" \
         "($(cat "$shipped/VERSION"), $shipped)" >&2
else
    echo "lbctl-entrypoint: no kernel headers: neither $modules/$kver/build nor $shipped;" \
         "install linux-headers-$kver on the node or rebuild the image" >&2
    exit 1
fi
exec "$@"

#!/bin/sh
# Merge Debian's two kernel header trees into one directory for BCC_KERNEL_SOURCE:
#   merge-kernel-headers.sh /usr/src /opt/lbctl/kernel-headers
# Debian splits a kernel's headers in -amd64 (.config, include/generated, include/config) and
# -common (everything else), which /lib/modules/<version>/{build,source} join for bcc; the
# variable names only one tree. Used by the Dockerfile and by tests/test_deploy.py.
set -eu
src=${1:?usage: merge-kernel-headers.sh SRC-DIR DEST-DIR}
dest=${2:?usage: merge-kernel-headers.sh SRC-DIR DEST-DIR}
amd64=$(ls -d "$src"/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
common=$(ls -d "$src"/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
if [ -z "$amd64" ] || [ -z "$common" ]; then
    echo "merge-kernel-headers: no linux-headers-*-amd64 and -common in $src (apt-get install linux-headers-amd64)" >&2
    exit 1
fi
mkdir -p "$dest"
cp -a "$common"/. "$dest"/
cp -a "$amd64"/. "$dest"/
rm -f "$dest/scripts"        # a relative link into linux-kbuild: kbuild, not bcc, needs it
basename "$amd64" | sed 's/^linux-headers-//' > "$dest/VERSION"
test -e "$dest/include/generated/autoconf.h"
test -e "$dest/include/linux/kconfig.h"

#!/bin/bash
# Provision the Debian 12 VM (vagrant/Vagrantfile): Docker, kind, kubectl, IPVS modules, lbctl's
# own dependencies. Idempotent; run as root. Versions are pinned and downloads checksummed.
set -euo pipefail

KIND_VERSION=v0.33.0            # its release notes list kindest/node:v1.37.0 (vagrant/kind-up.sh)
KUBECTL_VERSION=v1.37.2         # the version lbctl's lab builds (make k8s-bins)
SRC=${LBCTL_SRC:-/lbctl}

export DEBIAN_FRONTEND=noninteractive
apt-get update
# docker.io: Debian 12's own Docker (20.10); ipvsadm/ipset: to look at kube-proxy's IPVS mode
apt-get install -y --no-install-recommends make curl ca-certificates docker.io ipvsadm ipset \
    "linux-headers-$(uname -r)"
systemctl enable --now docker

# Debian's kernel builds IPVS as modules: load them now and at boot (kube-proxy --proxy-mode=ipvs
# in the kind nodes uses the VM's kernel)
grep -q '^CONFIG_IP_VS=m' "/boot/config-$(uname -r)"
printf '%s\n' ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh nf_conntrack > /etc/modules-load.d/ipvs.conf
for module in ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh nf_conntrack; do modprobe "$module"; done

install_checked() {   # install_checked URL SHA256-URL DEST: the file only if its checksum matches
    local tmp
    tmp=$(mktemp -d)
    curl -fsSLo "$tmp/bin" "$1"
    curl -fsSLo "$tmp/sum" "$2"
    echo "$(cut -d' ' -f1 "$tmp/sum")  $tmp/bin" | sha256sum --check --strict --quiet
    install -m 0755 "$tmp/bin" "$3"
    rm -rf "$tmp"
}
if ! kind version 2>/dev/null | grep -q "kind $KIND_VERSION "; then
    install_checked "https://github.com/kubernetes-sigs/kind/releases/download/$KIND_VERSION/kind-linux-amd64" \
        "https://github.com/kubernetes-sigs/kind/releases/download/$KIND_VERSION/kind-linux-amd64.sha256sum" \
        /usr/local/bin/kind
fi
if ! kubectl version --client 2>/dev/null | grep -q "Client Version: $KUBECTL_VERSION\$"; then
    install_checked "https://dl.k8s.io/release/$KUBECTL_VERSION/bin/linux/amd64/kubectl" \
        "https://dl.k8s.io/release/$KUBECTL_VERSION/bin/linux/amd64/kubectl.sha256" \
        /usr/local/bin/kubectl
fi
kind version
kubectl version --client
docker version --format 'docker {{.Server.Version}}'

# lbctl on the VM itself (the lab, make demo, make bench-modes)
make -C "$SRC" setup

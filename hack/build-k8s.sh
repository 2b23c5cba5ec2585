#!/usr/bin/env bash
# Builds the real Kubernetes control plane (kube-apiserver, kube-controller-manager, kube-proxy)
# and etcd from the Go module proxy, once per machine, into a cache outside the tree:
#     ~/.cache/lbctl/k8s-<version>/{kube-apiserver,kube-controller-manager,kube-proxy,etcd}
# Idempotent: a binary already there is not rebuilt. KUBEBUILDER_ASSETS (envtest's convention)
# pointing at a directory that has the binaries skips the build of those it has.
# Prints the directory with all four binaries on its last line of stdout.
#   hack/build-k8s.sh            build what is missing, print the directory
#   hack/build-k8s.sh --dir      only print the directory (no build), for scripts and tests
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
k8s_version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$here/k8s/go.mod")
etcd_version=$(awk '$1 == "require" && $2 == "go.etcd.io/etcd/server/v3" {print $3}' "$here/etcd/go.mod")
cache=${LBCTL_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lbctl}
out="$cache/k8s-$k8s_version"
bins=(kube-apiserver kube-controller-manager kube-proxy etcd)

have_all() { # dir
    local b
    for b in "${bins[@]}"; do [ -x "$1/$b" ] || return 1; done
}

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && have_all "$KUBEBUILDER_ASSETS"; then
    out=$KUBEBUILDER_ASSETS
fi
if [ "${1:-}" = "--dir" ]; then
    echo "$out"
    exit 0
fi
if have_all "$out"; then
    echo "$out"
    exit 0
fi

# The machine's own Go: go.mod says go 1.26.0, which Go 1.26 builds without fetching a toolchain.
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
mkdir -p "$out"
start=$(date +%s)

# Upstream's build stamps the version into component-base (hack/lib/version.sh); `go build` alone
# would report v0.0.0-master to `kubectl version` and to clients that read /version.
minor=${k8s_version#v*.}; minor=${minor%%.*}
k8s_x="-X k8s.io/component-base/version.gitVersion=$k8s_version"
k8s_x+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
k8s_x+=" -X k8s.io/component-base/version.gitTreeState=clean"

build() { # module-dir package binary [extra ldflags]
    local dir=$1 pkg=$2 bin=$3 ldflags="-s -w${4:+ $4}"
    if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/$bin" ]; then
        ln -sfn "$KUBEBUILDER_ASSETS/$bin" "$out/$bin"
        echo ">> $bin: from KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS" >&2
        return
    fi
    if [ -x "$out/$bin" ]; then
        echo ">> $bin: present in $out" >&2
        return
    fi
    echo ">> building $bin ($pkg) into $out (first build: many minutes on 2 cores)" >&2
    local t0=$(date +%s)
    # Build to a temporary name so an interrupted build never leaves a binary that looks done.
    # -v names each package as it is compiled: show every 50th as progress, and every other line
    # (a compiler error has spaces, a package path has none) as it comes.
    (cd "$dir" && nice -n 10 "$GO" build -v -trimpath -ldflags="$ldflags" -o "$out/.$bin.tmp" "$pkg" 2>&1) |
        awk '/ / { print; fflush(); next } { n++; if (n % 50 == 0) { printf ".. %s: %d packages (%s)\n", bin, n, $0; fflush() } }' bin="$bin" >&2
    mv -f "$out/.$bin.tmp" "$out/$bin"
    echo ">> $bin built in $(( $(date +%s) - t0 ))s" >&2
}

build "$here/etcd" go.etcd.io/etcd/server/v3 etcd
build "$here/k8s" k8s.io/kubernetes/cmd/kube-apiserver kube-apiserver "$k8s_x"
build "$here/k8s" k8s.io/kubernetes/cmd/kube-controller-manager kube-controller-manager "$k8s_x"
build "$here/k8s" k8s.io/kubernetes/cmd/kube-proxy kube-proxy "$k8s_x"
printf 'kubernetes %s\netcd %s\n' "$k8s_version" "$etcd_version" > "$out/VERSIONS"
echo ">> control plane ready in $out ($(( $(date +%s) - start ))s, $(du -sh "$out" | cut -f1))" >&2
echo "$out"

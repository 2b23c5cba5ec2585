#!/bin/bash
# A kind cluster on the VM, in one of four service proxies, then a smoke check (a Service answering
# from every backend through CoreDNS and a ClusterIP):
#   kind-up.sh lbctl      deploy/kind/cluster.yaml (kubeProxyMode: none) + lbctl's DaemonSet
#   kind-up.sh iptables   the same cluster with kube-proxy --proxy-mode=iptables
#   kind-up.sh nftables   ... nftables
#   kind-up.sh ipvs       ... ipvs (the VM's kernel has IPVS: vagrant/provision.sh)
#   kind-up.sh --print-config MODE   only print the kind config for MODE
# One cluster at a time: an existing cluster of another mode is deleted first.
set -euo pipefail

SRC=${LBCTL_SRC:-/lbctl}
NODE_IMAGE="kindest/node:v1.37.0@sha256:a1ed56cfb0e7b93589bdf97c8cd566405a265939e3620fc4f5de89adff580ae5"
AGNHOST="registry.k8s.io/e2e-test-images/agnhost:2.66.1"    # Kubernetes v1.37.2's e2e images
BUSYBOX="registry.k8s.io/e2e-test-images/busybox:1.37.0-2"
REPLICAS=3
REQUESTS=60

# The kind config for a mode: deploy/kind/cluster.yaml, with kube-proxy's mode instead of none.
# The cluster stays named "lbctl" for lbctl (the DaemonSet reaches lbctl-control-plane:6443).
kind_config() {
    local mode=$1
    case "$mode" in
        lbctl) cat "$SRC/deploy/kind/cluster.yaml" ;;
        iptables|nftables|ipvs)
            sed -e "s/^name: lbctl\$/name: kube-proxy-$mode/" \
                -e "s/^\\(  kubeProxyMode: \\)\"none\"/\\1\"$mode\"/" "$SRC/deploy/kind/cluster.yaml" ;;
        *) echo "kind-up.sh: unknown mode '$mode' (lbctl, iptables, nftables, ipvs)" >&2; return 2 ;;
    esac
}

if [ "${1:-}" = "--print-config" ]; then
    kind_config "${2:?usage: kind-up.sh --print-config MODE}"
    exit
fi
mode=${1:-lbctl}
config=$(mktemp)
trap 'rm -f "$config"' EXIT
kind_config "$mode" > "$config"
name=$(sed -n 's/^name: //p' "$config")

for other in $(kind get clusters 2>/dev/null); do
    if [ "$other" = lbctl ] || [ "${other#kube-proxy-}" != "$other" ]; then
        kind delete cluster --name "$other"
    fi
done
kind create cluster --config "$config" --image "$NODE_IMAGE"
kubectl config use-context "kind-$name"

if [ "$mode" = lbctl ]; then
    docker build -f "$SRC/deploy/Dockerfile" -t lbctl:dev "$SRC"
    kind load docker-image lbctl:dev --name "$name"
    kubectl apply -f "$SRC/deploy/kubernetes/"
    kubectl -n kube-system rollout status daemonset/lbctl --timeout=10m
fi
# without a service proxy the nodes' CNI (kindnet) and CoreDNS wait for one: Ready only now
kubectl wait --for=condition=Ready nodes --all --timeout=10m
kubectl -n kube-system rollout status deployment/coredns --timeout=10m

# The smoke check: a Deployment of agnhost netexec behind a ClusterIP Service, asked for its
# hostname by name (CoreDNS, itself behind the kube-dns ClusterIP) from a pod
kubectl delete deployment,service web --ignore-not-found
kubectl create deployment web --image="$AGNHOST" --replicas="$REPLICAS" -- /agnhost netexec --http-port=8080
kubectl expose deployment web --port=80 --target-port=8080
kubectl rollout status deployment/web --timeout=5m
start=$(date +%s.%N)
answers=$(kubectl run "smoke-$mode" --image="$BUSYBOX" --restart=Never --rm -i --quiet --command -- \
    sh -c "for i in \$(seq $REQUESTS); do wget -q -T 2 -O - http://web.default.svc.cluster.local/hostname; echo; done")
end=$(date +%s.%N)
echo "$answers" | sort | uniq -c
seen=$(echo "$answers" | sort -u | grep -c .)
echo "kind-up.sh: $mode: $REQUESTS requests in $(awk "BEGIN { printf \"%.1f\", $end - $start }") s (pod start included), answered by $seen of $REPLICAS pods"
if [ "$seen" -ne "$REPLICAS" ]; then
    echo "kind-up.sh: $mode: smoke check FAILED: not every backend answered" >&2
    exit 1
fi

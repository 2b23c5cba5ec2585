//go:build tools

// Package tools names the commands this module builds, so that `go mod tidy` keeps every
// module they need and `go build k8s.io/kubernetes/cmd/...` works from this directory.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)

//go:build tools

// Package tools names the etcd server command (go.etcd.io/etcd/server/v3 is a main package), so
// `go mod tidy` keeps what it needs and `go build go.etcd.io/etcd/server/v3` works from here.
package tools

import _ "go.etcd.io/etcd/server/v3"

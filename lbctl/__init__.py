"""lbctl: an eBPF/XDP replacement for kube-proxy."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lbctl")
except PackageNotFoundError:   # a source tree that was never installed
    __version__ = "0+unknown"

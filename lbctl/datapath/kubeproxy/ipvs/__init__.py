"""kube-proxy v1.32's IPVS mode as an lbctl datapath mode.

What kube-proxy's IPVS proxier (``pkg/proxy/ipvs/proxier.go``) keeps in the kernel, and so what
this package keeps there:

- a dummy device ``kube-ipvs0`` holding every cluster IP, and every external and load-balancer
  IP that is not already a node address, as /32 (/128): IPVS hooks LOCAL_IN, so a service address
  must be local for IPVS to see its packets;
- one IPVS virtual server per service address, port and protocol (cluster IP, external IPs,
  load-balancer IPs, and every node address for a NodePort), scheduler ``rr``, ``persistent``
  with the affinity timeout for ``sessionAffinity: ClientIP``; one masquerading real server of
  weight 1 per endpoint. A virtual server without real servers is how "no endpoints" looks: the
  kernel's ``ip_vs_leave`` answers ICMP port unreachable for TCP and UDP alike;
- 17 ipsets (KUBE-CLUSTER-IP, KUBE-LOOP-BACK, KUBE-NODE-PORT-TCP, ...) and a constant
  iptables-restore text that matches them: masquerade marks, source-range firewall, and the
  KUBE-IPVS-FILTER chain that rejects new connections to service addresses on ports no
  service uses.

One module per layer, each importing only the ones above it in this list:

``desired``
    pure data: ipset specs, IPVS objects, ``IpvsConfig``, ``desired_ipvs(ports, cfg)`` (everything
    above, following syncProxyRules line by line) and its text form for golden files.
``rules``
    pure text: ``render_ipvs_iptables(desired, cfg)``, the jump rules, the sysctls.
``kernel``
    ``IpvsKernel``, the narrow interface the mode writes through, and ``LinuxKernel`` over pyroute2's
    IPVS, IPRoute and IPSet plus iptables-restore. (The in-memory double, ``FakeKernel``, lives
    with the other test doubles in ``lbctl.testing.ipvs_kernel``.)
``mode``
    ``IpvsMode``, the Mode (see lbctl.datapath.base): every sync diffs desired state against what
    the kernel reports, so a restart or a failed sync converges on the next one.

Where lbctl deliberately differs from kube-proxy (each marked "deviation" in the code): when two
services claim the same virtual server the first by name keeps it (kube-proxy: the last one in
Go map order); a real server that comes back while draining gets its weight restored in place
(kube-proxy deletes and re-adds it, cutting its connections); a virtual server whose sync failed
keeps its address bound (kube-proxy unbinds it until the next sync); firewall-mark virtual
servers are never touched (they are not kube-proxy's).
"""
from lbctl.datapath.kubeproxy.ipvs.desired import (
    DUMMY_DEVICE,
    FLAG_PERSISTENT,
    FLAG_SOURCE_HASH,
    DesiredVirtualServer,
    IpsetSpec,
    IpvsConfig,
    IpvsDesired,
    RealServer,
    VirtualServer,
    desired_ipvs,
    format_desired,
    format_ipvsadm,
    ipset_specs,
    set_name,
)
from lbctl.datapath.kubeproxy.ipvs.kernel import IPVS_MISSING, IpvsKernel, LinuxKernel
from lbctl.datapath.kubeproxy.ipvs.mode import IpvsMode, collect
from lbctl.datapath.kubeproxy.ipvs.rules import (
    IPTABLES_CHAINS,
    JUMP_RULES,
    ipvs_sysctls,
    render_ipvs_iptables,
    render_ipvs_jump_rules,
)

__all__ = [
    "DUMMY_DEVICE",
    "FLAG_PERSISTENT",
    "FLAG_SOURCE_HASH",
    "IPTABLES_CHAINS",
    "IPVS_MISSING",
    "JUMP_RULES",
    "DesiredVirtualServer",
    "IpsetSpec",
    "IpvsConfig",
    "IpvsDesired",
    "IpvsKernel",
    "IpvsMode",
    "LinuxKernel",
    "RealServer",
    "VirtualServer",
    "collect",
    "desired_ipvs",
    "format_desired",
    "format_ipvsadm",
    "ipset_specs",
    "ipvs_sysctls",
    "render_ipvs_iptables",
    "render_ipvs_jump_rules",
    "set_name",
]

/* lbctl_shared.h: every map key and value, flag bit and counter index.
 *
 * Shared by the BPF programs (compiled by bcc) and the Python control plane, which reads this
 * very file with cffi (lbctl/datapath/ebpf/shared.py): plain structs of fixed-width types with
 * explicit padding, and integer #defines only. No struct is written twice; tests/test_layout.py checks that the
 * compiled program and Python agree on every size and offset.
 *
 * Byte order lives in the type: __be32/__be16 fields are network order, everything else host.
 */
#ifndef LBCTL_SHARED_H
#define LBCTL_SHARED_H

/* Default map sizes; `lbctl run --max-services/--max-backends/--ct-size` override them at
 * compile time (-D). The structure holds 100,000 services and 1,000,000 backends as is:
 * only these numbers change. */
#ifndef LB_SERVICES_MAP_SIZE
#define LB_SERVICES_MAP_SIZE 131072   /* frontend (slot 0) + backend slot entries */
#endif
#ifndef LB_BACKENDS_MAP_SIZE
#define LB_BACKENDS_MAP_SIZE 65536    /* backend ids 1..size-1; id 0 means "none" */
#endif
#ifndef LB_SERVICE_IDS
#define LB_SERVICE_IDS 65536          /* service ids (counter index) 1..size-1 */
#endif
#ifndef LB_AFFINITY_MAP_SIZE
#define LB_AFFINITY_MAP_SIZE 65536    /* sessionAffinity: ClientIP entries (client, service) */
#endif
#ifndef LB_CT_MAP_SIZE
#define LB_CT_MAP_SIZE 262144         /* connection tracking entries (2 per flow) */
#endif
#ifndef LB_SOURCE_RANGES_MAP_SIZE
#define LB_SOURCE_RANGES_MAP_SIZE 16384 /* loadBalancerSourceRanges prefixes, all services */
#endif

/* Maglev consistent hashing (Eisenbud et al., NSDI 2016), a per-service option (lib/maglev.h,
 * lbctl/datapath/ebpf/maglev.py). A table is M slots, M prime; each names a backend id. */
#define LB_MAGLEV_DEFAULT_TABLE_SIZE 16381  /* M, Cilium's default: balance needs M >> backends */
#define LB_MAGLEV_MAX_TABLE_SIZE 131071     /* the largest M accepted (Cilium's largest too) */
#define LB_MAGLEV_HASH_SEED 0x6c62636d      /* jhash seed of the 5-tuple: one constant, so every
					     * node picks the same slot for the same flow */
#ifndef LB_MAGLEV_MAP_SIZE
#define LB_MAGLEV_MAP_SIZE 131072           /* tables: one per Maglev frontend and scope */
#endif

/* Connection tracking lifetimes, seconds (as Cilium's defaults: kube-proxy leaves TCP to
 * nf_conntrack, whose established timeout it raises to 1 day; 6 h is what Cilium uses). */
#define LB_CT_LIFETIME_TCP 21600        /* established: a reply has been seen */
#define LB_CT_LIFETIME_SYN 60           /* TCP before any reply: a port sprayer cannot push
					 * established flows out of the LRU for hours */
#define LB_CT_LIFETIME_NONTCP 60
#define LB_CT_LIFETIME_CLOSING 10       /* after a RST, or a FIN from each side */
#define LB_CT_REFRESH_NS 1000000000ULL  /* rewrite a live entry's last_seen at most once a second */

/* lb4_service_key.scope: which slot set of a frontend a packet is balanced over (Cilium's
 * two-scope services). Each scope is a frontend of its own: slot 0 (count, flags, service_id)
 * and slots 1..count. */
#define LB_SCOPE_EXTERNAL 0           /* every frontend's default set. ClusterIP: its endpoints
				       * (iTP Local: the node's own). NodePort, ExternalIP and
				       * LoadBalancer with eTP Local: the node's own endpoints only */
#define LB_SCOPE_INTERNAL 1           /* all the cluster's endpoints, for traffic from inside the
				       * cluster (pods on this node, sources in the cluster CIDR);
				       * present only when scope 0's slot 0 has LB_SVC_F_TWO_SCOPES */

/* lb4_service_value.flags (slot 0 only). One type flag per frontend (CLUSTERIP, NODEPORT,
 * EXTERNAL_IP, LOADBALANCER); the others are options. */
#define LB_SVC_F_CLUSTERIP 0x01       /* a ClusterIP frontend */
#define LB_SVC_F_AFFINITY 0x02        /* sessionAffinity: ClientIP; timeout in affinity_timeout */
#define LB_SVC_F_DROP 0x04            /* count 0 means drop, not reject: the packet leaves with
				       * the drop mark, as kube-proxy's DROP for iTP Local (or, in
				       * scope 0 with LB_SVC_F_ETP_LOCAL, eTP Local) without a local
				       * endpoint while the cluster has some */
#define LB_SVC_F_NODEPORT 0x08        /* a NodePort frontend: one per node address taking them */
#define LB_SVC_F_EXTERNAL_IP 0x10     /* a spec.externalIPs address */
#define LB_SVC_F_LOADBALANCER 0x20    /* a status.loadBalancer.ingress IP */
#define LB_SVC_F_ETP_LOCAL 0x40       /* externalTrafficPolicy Local: external traffic keeps its
				       * source and goes to scope 0 (local endpoints); without
				       * it, external traffic is masqueraded */
#define LB_SVC_F_TWO_SCOPES 0x80      /* internal traffic uses scope LB_SCOPE_INTERNAL */
#define LB_SVC_F_SOURCE_RANGES 0x100  /* loadBalancerSourceRanges: a source must match the
				       * service's prefixes in lb4_source_ranges, else drop mark */
#define LB_SVC_F_MAGLEV 0x200         /* Maglev consistent hashing instead of uniform random */

/* lb4_backend.flags */
#define LB_BACKEND_F_DRAINING 0x01    /* in no slot: only established flows (and no affinity) */

/* lb4_ct_key.dir: the two entries kept per flow */
#define LB_CT_FORWARD 0               /* client -> VIP: value names the chosen backend */
#define LB_CT_REPLY 1                 /* backend -> client: value names the VIP to restore */

/* lb4_ct_value.flags: fixed when the flow is created, never written afterwards */
#define LB_CT_F_HAIRPIN 0x02          /* a pod reached itself: source rewritten to LB_HAIRPIN_ADDR */
#define LB_CT_F_MASQUERADE 0x04       /* the flow's client packets leave with the masquerade mark */

/* lb4_ct_value.tx_state / rx_state: what each side of a flow has sent. The two directions of a
 * flow are usually handled on two CPUs at once, so each byte has one writer: tx_state only the
 * forward path (client -> backend), rx_state only the reply path; a bit once set stays set. The
 * entry's lifetime is derived from both when it is read (lb4_ct_lifetime), never stored, so a
 * FIN from each side at the same instant cannot leave a closed flow established for hours. */
#define LB_CT_SEEN_PKT 0x01           /* a packet (rx_state: the backend has answered) */
#define LB_CT_SEEN_FIN 0x02
#define LB_CT_SEEN_RST 0x04

/* Hairpin: a pod whose connection to its own service lands on itself would receive a packet
 * from its own address, which Linux drops as martian. As kube-proxy masquerades such flows,
 * lbctl rewrites their source to this link-local address (Cilium's choice too), host order. */
#define LB_HAIRPIN_ADDR 0xa9fe2a01    /* 169.254.42.1 */

/* Datapath-wide counters: index into the lb_global_stats per-CPU array. */
#define LB_STAT_PASS_NOT_IP 0         /* not IPv4 (ARP, IPv6...): passed untouched */
#define LB_STAT_PASS_MALFORMED 1      /* truncated or bad IP/L4 header: passed untouched */
#define LB_STAT_PASS_FRAGMENT 2       /* IP fragment: passed untouched (no L4 ports to match) */
#define LB_STAT_PASS_NO_SERVICE 3     /* IPv4 not for a service: passed untouched */
#define LB_STAT_SVC_NEW_FLOW 4        /* backend chosen for a new flow */
#define LB_STAT_SVC_CT_HIT 5          /* packet of a known flow */
#define LB_STAT_SVC_RESELECT 6        /* known flow whose backend vanished: chosen again */
#define LB_STAT_REVNAT 7              /* reply rewritten back to the VIP */
#define LB_STAT_NO_BACKEND 8          /* service without endpoints: rejected (TCP RST, ICMP port
				       * unreachable), or dropped with LB_SVC_F_DROP */
#define LB_STAT_CT_FULL 9             /* conntrack update failed */
#define LB_STAT_NAT_FAILED 10         /* a rewrite helper failed: packet dropped */
#define LB_STAT_STALE_REPLY 11        /* reply entry of a finished flow (its forward entry names
				       * another backend, or expired and the reply is a SYN-ACK or
				       * not TCP): passed untouched, removed */
#define LB_STAT_CT_EVICTED 12         /* one entry of a live flow found without the other, which
				       * only the LRU removes: a reply entry without its forward
				       * entry (the reply passed untouched, the entry removed), or an
				       * unexpired forward entry without its reply entry (put back).
				       * Not 0: lb4_ct is too small for the flows (README, "Sizing") */
#define LB_STAT_SVC_MIDFLOW_MISS 13   /* TCP segment without SYN to a service, no forward entry
				       * (evicted, or a flow older than the maps): balanced as a new
				       * flow, so a backend that never saw it answers with a RST */
#define LB_STAT_DROP_ETP_LOCAL 14     /* external traffic to an eTP Local frontend without a
				       * local endpoint: drop mark */
#define LB_STAT_DROP_SOURCE_RANGE 15  /* source outside loadBalancerSourceRanges: drop mark */
#define LB_STAT_DROP_ITP_LOCAL 16     /* iTP Local frontend without a local endpoint: drop mark */
#define LB_STAT_MASQUERADE 17         /* packet given the masquerade mark */
#define LB_STAT_PASS_UNTRACKED 18     /* a TCP segment without SYN to a NodePort, ExternalIP or
				       * LoadBalancer frontend, of no flow lbctl knows: passed to
				       * the stack (the reply of a masqueraded flow whose SNAT port
				       * equals a frontend's is netfilter's, not a new flow) */
#define LB_STAT_XDP_NO_META 19        /* XDP could not reserve its metadata: passed untouched,
				       * for the tc program's full path */
#define LB_STAT_SOCK_CONNECT 20       /* socket LB: connect() of a host socket to a frontend sent
				       * to a backend (TCP, connected UDP) */
#define LB_STAT_SOCK_SENDMSG 21       /* socket LB: an unconnected UDP datagram to a frontend sent
				       * to a backend */
#define LB_STAT_SOCK_REVNAT 22        /* socket LB: recvfrom()/getpeername() answered with the
				       * frontend instead of the backend */
#define LB_STAT_SOCK_REVNAT_STALE 23  /* socket LB: a socket's frontend was removed or given to
				       * another service: its backend's address is shown as is */
#define LB_STAT_SOCK_REVERSE_FULL 24  /* socket LB: lb4_reverse_sk could not take an entry: the
				       * connect()/sendmsg() failed with ENOMEM */
#define LB_STAT_MAX 25

/* Marks, as kube-proxy's (KUBE-MARK-MASQ, KUBE-MARK-DROP): the datapath ORs them into
 * skb->mark; one constant POSTROUTING rule masquerades 0x4000, one filter rule drops 0x8000.
 * lb4_config may name other bits (--iptables-masquerade-bit). */
#define LB_MARK_MASQ_DEFAULT 0x4000
#define LB_MARK_DROP_DEFAULT 0x8000

/* lb4_config.flags */
#define LB_CFG_F_MASQUERADE_ALL 0x01  /* --masquerade-all: every service packet is masqueraded */
#define LB_CFG_F_CLUSTER_CIDR 0x02    /* cluster_cidr/cluster_prefix_len hold --cluster-cidr:
				       * ClusterIP traffic from outside it is masqueraded, and
				       * uplink traffic from inside it is internal */
#define LB_CFG_F_DROP_RULE 0x04       /* the constant filter rule dropping the drop mark is in
				       * place: drops leave with the mark. Without it (never
				       * written, or the rule could not be installed) the datapath
				       * drops them itself, so nothing kube-proxy drops gets through */

/* lb4_config: the datapath's settings, one entry (index 0) the control plane writes. All zero
 * (never written) means kube-proxy's defaults: default marks, no cluster CIDR. */
struct lb4_config {
	__be32 cluster_cidr;          /* network address */
	__u8 cluster_prefix_len;      /* 0..32 */
	__u8 pad[3];
	__u32 flags;                  /* LB_CFG_F_* */
	__u32 masq_mark;              /* 0: LB_MARK_MASQ_DEFAULT */
	__u32 drop_mark;              /* 0: LB_MARK_DROP_DEFAULT */
};

/* lb4_source_ranges: LPM trie of loadBalancerSourceRanges, per service. The first 32 bits of
 * the prefix are the service id (always matched whole), the rest the range:
 * prefixlen = 32 + the range's length. Value: 1. */
struct lb4_source_range_key {
	__u32 prefixlen;
	__u32 service_id;             /* compared bytewise as any LPM key: host order on both sides */
	__be32 address;
};

/* XDP -> tc on the same link: XDP cannot set skb->mark, so the uplink's XDP program leaves this
 * in the packet's metadata (bpf_xdp_adjust_meta) for every packet it handled, and the tc
 * ingress program only ORs `mark` into skb->mark. Without it (XDP not attached, or it could
 * not reserve room) tc runs the whole path itself. */
#define LB_XDP_META_MAGIC 0x6c627864  /* "lbxd" */

struct lb_xdp_meta {
	__u32 magic;                  /* LB_XDP_META_MAGIC */
	__u32 mark;                   /* bits to OR into skb->mark; 0: none */
};

/* lb4_services: frontends and their backend slots, Cilium's layout.
 * Slot 0 is the frontend (VIP:port/proto) and holds `count`; slots 1..count hold backend ids. */
struct lb4_service_key {
	__be32 address;               /* service VIP */
	__be16 dport;                 /* service port */
	__u16 backend_slot;           /* 0 = frontend, 1..count = backends */
	__u8 proto;                   /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 scope;                   /* LB_SCOPE_* */
	__u8 pad[2];
};

struct lb4_service_value {
	union {
		__u32 backend_id;     /* slots 1..count: id into lb4_backends */
		__u32 affinity_timeout; /* slot 0: sessionAffinity timeout, seconds */
	};
	__u16 count;                  /* slot 0: number of backend slots (0: no endpoints) */
	__u16 flags;                  /* slot 0: LB_SVC_F_* */
	__u32 service_id;             /* index into lb_service_stats; same in every slot */
};

/* lb4_maglev: the Maglev table of a frontend's scope (hash of maps). The inner map is an array
 * of M + 1 __u32: index 0 holds M (as slot 0 of lb4_services holds the count), 1..M backend
 * ids. A new flow takes index 1 + jhash(5-tuple) % M. Tables are replaced whole: a new inner
 * map is filled, then swapped in with one update of the outer map. */
struct lb4_maglev_key {
	__u32 service_id;             /* lb4_service_value.service_id of the frontend */
	__u8 scope;                   /* LB_SCOPE_*: each scope has its own backend set */
	__u8 pad[3];
};

/* lb4_backends: id -> endpoint address. Ids are small integers handed out by the control plane
 * and recovered from this map when the agent restarts, so restarts do not move flows. */
struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags;
};

/* lb4_ct: connection tracking (LRU), two entries per flow. */
struct lb4_ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir;                     /* LB_CT_FORWARD / LB_CT_REPLY */
	__u8 pad[2];
};

struct lb4_ct_value {
	__be32 nat_address;           /* forward: backend; reply: VIP */
	__be16 nat_port;              /* forward: backend port; reply: service port */
	__u8 flags;                   /* LB_CT_F_*: set at creation only */
	__u8 pad;
	__u32 backend_id;             /* the backend chosen (the forward entry's is checked on every
				       * packet; a reply entry translates only while they agree) */
	__u32 service_id;
	__u8 tx_state;                /* LB_CT_SEEN_* from the client: the forward path writes it */
	__u8 rx_state;                /* LB_CT_SEEN_* from the backend: the reply path writes it */
	__u8 pad2[6];
	__u64 last_seen;              /* bpf_ktime_get_ns() of the flow's last packet, either way,
				       * written at most once per LB_CT_REFRESH_NS; the entry expires
				       * lb4_ct_lifetime() after it */
};

/* lb4_affinity: sessionAffinity ClientIP, as kube-proxy's `-m recent` / IPVS persistence: a
 * client's new connections go to the backend its last one used, within the timeout. */
struct lb4_affinity_key {
	__be32 client;
	__u32 service_id;
};

struct lb4_affinity_value {
	__u32 backend_id;
	__be32 address;               /* the backend's address and port, to notice a recycled id */
	__be16 port;
	__u8 pad[6];
	__u64 last_used;              /* bpf_ktime_get_ns() of the last new connection */
};

/* lb_service_stats / lb_backend_stats: per-CPU counters, summed by `lbctl dump maps`. */
struct lb_stats {
	__u64 packets;
	__u64 bytes;
	__u64 flows;                  /* new flows (connections) */
};

/* `lbctl trace`: the program compiled with -DLB_TRACE writes no map and reports what it decided
 * in lb_trace (a map only that build has), which the tracer reads after one BPF_PROG_TEST_RUN. */
#define LB_TRACE_F_SERVICE 0x0001       /* the destination is a frontend */
#define LB_TRACE_F_CT_FOUND 0x0002      /* the flow has a forward entry */
#define LB_TRACE_F_CT_CLOSING 0x0004    /* ... closed (RST, or FIN both ways) and this is a SYN */
#define LB_TRACE_F_CT_EXPIRED 0x0008    /* ... expired, and this is a SYN (or SYN-ACK) or not TCP */
#define LB_TRACE_F_CT_BACKEND_GONE 0x0010 /* ... naming a backend deleted or changed since */
#define LB_TRACE_F_AFFINITY 0x0020      /* the backend came from the client's affinity entry */
#define LB_TRACE_F_HAIRPIN 0x0040       /* a pod reaching itself: sent back out of its own link */
#define LB_TRACE_F_REPLY 0x0080         /* the packet matched a reply entry */
#define LB_TRACE_F_SVC_DROP 0x0100      /* no endpoints, and the frontend says drop (LB_SVC_F_DROP) */
#define LB_TRACE_F_SOURCE_RANGE_DROP 0x0200 /* source outside loadBalancerSourceRanges */
#define LB_TRACE_F_MASQUERADE 0x0400    /* the packet leaves with the masquerade mark */
#define LB_TRACE_F_INTERNAL 0x0800      /* balanced over the frontend's internal scope */
#define LB_TRACE_F_UPLINK 0x1000        /* handled as arriving by the uplink (lbctl trace --uplink) */

struct lb4_trace_result {
	__u32 stats;                  /* bit i set: the packet counted LB_STAT_i */
	__u32 flags;                  /* LB_TRACE_F_* */
	__u32 service_id;             /* the frontend's (or, for a reply, the flow's) service */
	__u32 backend_id;             /* the backend the packet goes to, or replies from */
	__u32 ct_backend_id;          /* the backend the flow's forward entry named */
	__u16 slot;                   /* the slot a new flow picked (0: none, affinity or a hit) */
	__u16 count;                  /* the frontend's slot count */
	__u32 mark;                   /* the bits the packet leaves with (masquerade/drop mark) */
};

/* lb4_reverse_sk: host-originated traffic is balanced where the socket names its destination
 * (cgroup connect4/sendmsg4, bpf/prog/lbctl_sock.c): the socket is sent to the backend itself
 * and no packet is rewritten. This map remembers, per socket and backend, the frontend the
 * application asked for, so that getpeername() and recvfrom() answer with it (recvmsg4,
 * getpeername4), as Cilium's lb4_reverse_sk. LRU: entries of closed sockets fall out. */
#ifndef LB_REVERSE_SK_MAP_SIZE
#define LB_REVERSE_SK_MAP_SIZE 65536
#endif

struct lb4_reverse_sk_key {
	__u64 cookie;                 /* bpf_get_socket_cookie(): one socket, machine-wide */
	__be32 address;               /* the backend the socket was sent to */
	__be16 port;
	__u8 pad[2];
};

struct lb4_reverse_sk_value {
	__be32 address;               /* the frontend: cluster IP, node address, external IP */
	__be16 port;
	__u8 proto;
	__u8 pad;
	__u32 service_id;             /* the frontend's, to notice it was removed or reassigned */
};

#endif /* LBCTL_SHARED_H */

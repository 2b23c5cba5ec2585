/* sock.h: socket-level load balancing for host-originated traffic (kube-proxy's OUTPUT path:
 * the node's processes, hostNetwork pods), in cgroup v2 sock_addr programs.
 *
 * connect() and an unconnected sendmsg() to a frontend have their destination replaced by a
 * backend before the kernel routes anything: a connection picks its backend once, no packet is
 * rewritten, no conntrack entry is needed. The backend choice and affinity are lib/lb.h's, over
 * the same maps as the tc programs. lb4_reverse_sk remembers (socket, backend) -> frontend so
 * that recvmsg() and getpeername() name the frontend, as a DNATed flow's replies would.
 *
 * Host traffic is in-cluster traffic: a frontend with two scopes (eTP Local NodePorts,
 * externalIPs, load-balancer IPs) is balanced over its internal scope, all endpoints, as
 * kube-proxy sends node-originated traffic to KUBE-SVC-* (every endpoint), not KUBE-SVL-*.
 *
 * A frontend without endpoints fails the call at once: ECONNREFUSED where the tc path answers
 * with a reject (what a TCP connect() sees of an ICMP port unreachable, or of a RST), and
 * EHOSTUNREACH where it drops (internalTrafficPolicy Local without a local endpoint: Cilium's
 * errno for a service it cannot serve; kube-proxy's DROP leaves a TCP connect() hanging until
 * ETIMEDOUT and a datagram silently lost, which no socket-level hook can reproduce).
 *
 * Needs the maps, lb4_reverse_sk, stats.h and lb.h (lb4_select_backend, lb4_affinity_*). */
#ifndef LBCTL_SOCK_H
#define LBCTL_SOCK_H

#define LB_SOCK_PROCEED 1             /* the call goes on (with the address we may have set) */
#define LB_SOCK_REJECT 0              /* the call fails with the errno given by bpf_set_retval */

#define LB_LOOPBACK_NET 0x7f000000    /* 127.0.0.0/8, host order */
#define LB_LOOPBACK_ADDR 0x7f000001   /* 127.0.0.1: where localhost NodePorts are programmed */

/* user_port holds the port in network order in its low 16 bits; the kernel only allows full
 * 32-bit loads of it. */
static __always_inline __be16 lb_sock_dport(const struct bpf_sock_addr *ctx)
{
	volatile __u32 port = ctx->user_port;

	return (__be16)port;
}

/* The frontend a socket names: an exact frontend, else for a loopback address the localhost
 * NodePort (kube-proxy's iptables mode accepts NodePorts on every 127.0.0.0/8 address from the
 * node itself, route_localnet): programmed at 127.0.0.1 when --nodeport-addresses takes
 * loopback. `key` is left at the frontend found. */
static __always_inline struct lb4_service_value *lb4_sock_frontend(struct lb4_service_key *key)
{
	struct lb4_service_value *svc = lb4_services.lookup(key);

	if (svc)
		return svc;
	if ((bpf_ntohl(key->address) & 0xff000000) != LB_LOOPBACK_NET ||
	    key->address == bpf_htonl(LB_LOOPBACK_ADDR))
		return NULL;
	key->address = bpf_htonl(LB_LOOPBACK_ADDR);
	svc = lb4_services.lookup(key);
	if (svc && (svc->flags & LB_SVC_F_NODEPORT))
		return svc;
	return NULL;
}

/* The client address sessionAffinity keys on: the socket's bound source, else 0, which all the
 * node's unbound sockets share (kube-proxy sees them all come from the node's address). */
static __always_inline __be32 lb4_sock_client(const struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;

	return sk ? sk->src_ip4 : 0;
}

/* Counts a new connection (or datagram) on its service and backend: no packet went through
 * the socket programs, so only `flows` moves. */
static __always_inline void lb_sock_account(__u32 service_id, __u32 backend_id)
{
	struct lb_stats *stats = lb_service_stats.lookup(&service_id);

	if (stats)
		stats->flows += 1;
	stats = lb_backend_stats.lookup(&backend_id);
	if (stats)
		stats->flows += 1;
}

static __always_inline int lb_sock_fail(int err, __u32 stat)
{
	lb_count(stat);
	bpf_set_retval(err);
	return LB_SOCK_REJECT;
}

/* connect4 (`stat` LB_STAT_SOCK_CONNECT) and sendmsg4 (LB_STAT_SOCK_SENDMSG). */
static __always_inline int lb4_sock_forward(struct bpf_sock_addr *ctx, __u32 stat)
{
	struct lb4_service_key frontend = {
		.address = ctx->user_ip4, .dport = lb_sock_dport(ctx), .proto = ctx->protocol,
		.scope = LB_SCOPE_EXTERNAL,
	};
	struct lb4_reverse_sk_key rkey = { .cookie = bpf_get_socket_cookie(ctx) };
	struct lb4_reverse_sk_value rval = {};
	struct lb4_service_value *found, svc;
	struct lb4_packet client = { .saddr = lb4_sock_client(ctx) };
	struct lb4_nat_target target = {};
	struct lb4_backend *backend = NULL;
	__u64 now;

	if (frontend.proto != IPPROTO_TCP && frontend.proto != IPPROTO_UDP)
		return LB_SOCK_PROCEED;
	found = lb4_sock_frontend(&frontend);
	if (!found)
		return LB_SOCK_PROCEED;
	svc = *found;   /* a copy: the control plane may rewrite the frontend meanwhile */
	rval.address = ctx->user_ip4;   /* what the application named (127.0.0.7, not 127.0.0.1) */
	rval.port = frontend.dport;
	rval.proto = frontend.proto;
	rval.service_id = svc.service_id;
	if (svc.flags & LB_SVC_F_TWO_SCOPES) {
		frontend.scope = LB_SCOPE_INTERNAL;
		found = lb4_services.lookup(&frontend);
		if (!found)   /* scope 1 is written before scope 0 names it: a removal under way */
			return lb_sock_fail(-ECONNREFUSED, LB_STAT_NO_BACKEND);
		svc.count = found->count;
		svc.flags = found->flags | (svc.flags & LB_SVC_F_AFFINITY);
	}
	if (svc.count == 0) {
		if (svc.flags & LB_SVC_F_DROP)
			return lb_sock_fail(-EHOSTUNREACH, LB_STAT_DROP_ITP_LOCAL);
		return lb_sock_fail(-ECONNREFUSED, LB_STAT_NO_BACKEND);
	}
	now = bpf_ktime_get_ns();
	if (svc.flags & LB_SVC_F_AFFINITY)
		backend = lb4_affinity_backend(&client, &svc, &target.backend_id, now);
	if (!backend)
		backend = lb4_select_backend(&frontend, svc.count, &target.backend_id);
	if (!backend)   /* a slot being rewritten: as the tc path, count it and give up */
		return lb_sock_fail(-ECONNREFUSED, LB_STAT_NO_BACKEND);
	target.address = backend->address;
	target.port = backend->port;
	rkey.address = target.address;
	rkey.port = target.port;
	if (lb4_reverse_sk.update(&rkey, &rval) < 0)
		return lb_sock_fail(-ENOMEM, LB_STAT_SOCK_REVERSE_FULL);
	if (svc.flags & LB_SVC_F_AFFINITY)
		lb4_affinity_update(&client, svc.service_id, &target, now);
	lb_sock_account(svc.service_id, target.backend_id);
	lb_count(stat);
	ctx->user_ip4 = target.address;
	ctx->user_port = (__u32)target.port;
	return LB_SOCK_PROCEED;
}

/* recvmsg4 and getpeername4: a backend's address, as the socket sees it, back to the frontend
 * the application named, while that frontend still belongs to the same service. */
static __always_inline void lb4_sock_reverse(struct bpf_sock_addr *ctx)
{
	struct lb4_reverse_sk_key rkey = {
		.cookie = bpf_get_socket_cookie(ctx), .address = ctx->user_ip4,
		.port = lb_sock_dport(ctx),
	};
	struct lb4_reverse_sk_value *rval = lb4_reverse_sk.lookup(&rkey);
	struct lb4_service_key frontend = {};
	struct lb4_service_value *svc;

	if (!rval)
		return;
	frontend.address = rval->address;
	frontend.dport = rval->port;
	frontend.proto = rval->proto;
	frontend.scope = LB_SCOPE_EXTERNAL;
	svc = lb4_sock_frontend(&frontend);
	if (!svc || svc->service_id != rval->service_id) {
		lb4_reverse_sk.delete(&rkey);
		lb_count(LB_STAT_SOCK_REVNAT_STALE);
		return;
	}
	ctx->user_ip4 = rval->address;
	ctx->user_port = (__u32)rval->port;
	lb_count(LB_STAT_SOCK_REVNAT);
}

#endif /* LBCTL_SOCK_H */

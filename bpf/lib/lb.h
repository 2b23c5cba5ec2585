/* lb.h: the load balancer's decisions, for any program: a packet to a service goes to its
 * flow's backend or to one chosen now (uniform random among the slots, as kube-proxy's
 * `statistic --mode random` chains), sessionAffinity, hairpin, traffic policies, source
 * ranges, the masquerade and drop marks; a reply goes back as from the service. Needs the
 * maps, stats.h, conntrack.h, nat.h and reject.h.
 *
 * Marks, not drops: a packet kube-proxy would drop (eTP/iTP Local without a local endpoint, a
 * source outside loadBalancerSourceRanges) leaves untouched with the drop mark, and one
 * constant filter rule drops it (KUBE-MARK-DROP), once the control plane has said that rule is
 * in place (LB_CFG_F_DROP_RULE; until then it is dropped here). One kube-proxy would
 * masquerade leaves DNATed with the masquerade mark, and one constant POSTROUTING rule
 * masquerades it. The caller puts lb4_verdict.mark on the skb (tc) or in the metadata (XDP). */
#ifndef LBCTL_LB_H
#define LBCTL_LB_H

/* Where a packet entered the datapath: this decides its scope (internal or external source),
 * hairpin handling and masquerading, as kube-proxy decides them from -s/--src-type matches. */
#define LB_ORIGIN_POD 0x00            /* ingress of a pod's link: inside the cluster */
#define LB_ORIGIN_UPLINK 0x01         /* the uplink: outside, unless the source is in the
				       * cluster CIDR (another node's pod) */
#define LB_ORIGIN_XDP 0x02            /* with UPLINK: the XDP program, which leaves rejects (a
				       * rewrite into a new packet sent back) to the tc program */

/* What a service packet leaves with besides the action. */
struct lb4_verdict {
	__u32 mark;                   /* bits for skb->mark: masquerade and/or drop */
	__u8 defer;                   /* XDP: untouched, for tc's full path (a reject) */
	__u8 pad[3];
};

static __always_inline struct lb4_config *lb4_config_get(void)
{
	__u32 zero = 0;

	return lb4_config.lookup(&zero);
}

static __always_inline __u32 lb4_masq_mark(const struct lb4_config *cfg)
{
	return cfg && cfg->masq_mark ? cfg->masq_mark : LB_MARK_MASQ_DEFAULT;
}

static __always_inline __u32 lb4_drop_mark(const struct lb4_config *cfg)
{
	return cfg && cfg->drop_mark ? cfg->drop_mark : LB_MARK_DROP_DEFAULT;
}

/* A packet kube-proxy drops: it leaves with the drop mark for the constant filter rule, or,
 * until the control plane says that rule is in place (LB_CFG_F_DROP_RULE), is dropped here. */
static __always_inline int lb4_drop(const struct lb4_config *cfg, struct lb4_verdict *v)
{
	if (cfg && (cfg->flags & LB_CFG_F_DROP_RULE)) {
		v->mark |= lb4_drop_mark(cfg);
		return CTX_ACT_OK;
	}
	return CTX_ACT_DROP;
}

/* The source is in --cluster-cidr (never, when none is configured). */
static __always_inline int lb4_in_cluster(const struct lb4_config *cfg, __be32 addr)
{
	__u32 len, mask;

	if (!cfg || !(cfg->flags & LB_CFG_F_CLUSTER_CIDR))
		return 0;
	len = cfg->cluster_prefix_len;
	if (len == 0)
		return 1;
	if (len > 32)
		return 0;
	mask = 0xffffffffU << (32 - len);
	return ((bpf_ntohl(addr) ^ bpf_ntohl(cfg->cluster_cidr)) & mask) == 0;
}

/* Traffic from inside the cluster: a pod of this node, or by the uplink from the cluster CIDR. */
static __always_inline int lb4_internal_source(const struct lb4_config *cfg, const struct lb4_packet *pkt,
					       int origin)
{
	return !(origin & LB_ORIGIN_UPLINK) || lb4_in_cluster(cfg, pkt->saddr);
}

#define LB_SVC_F_EXTERNAL_TYPES (LB_SVC_F_NODEPORT | LB_SVC_F_EXTERNAL_IP | LB_SVC_F_LOADBALANCER)

/* Whether a new flow's client packets are masqueraded, as kube-proxy's KUBE-MARK-MASQ rules:
 * --masquerade-all; a NodePort/externalIP/LoadBalancer frontend with eTP Cluster (every source:
 * "masquerade traffic for external destinations"); a ClusterIP reached from outside the cluster
 * CIDR (when one is set); a client that is its own backend arriving by the uplink (hairpin
 * through the stack; a pod link's hairpin is rewritten and sent back instead). `flags`: the
 * scope 0 frontend's. */
static __always_inline int lb4_masquerade(const struct lb4_config *cfg, const struct lb4_packet *pkt,
					  __u16 flags, int origin, __be32 backend)
{
	if (cfg && (cfg->flags & LB_CFG_F_MASQUERADE_ALL))
		return 1;
	if (flags & LB_SVC_F_EXTERNAL_TYPES) {
		if (!(flags & LB_SVC_F_ETP_LOCAL))
			return 1;
	} else if ((cfg && (cfg->flags & LB_CFG_F_CLUSTER_CIDR)) && !lb4_in_cluster(cfg, pkt->saddr)) {
		return 1;
	}
	return (origin & LB_ORIGIN_UPLINK) && backend == pkt->saddr;
}

/* The backend a tracked flow keeps, or NULL when it must choose again: a SYN on a closed tuple
 * or after the entry expired, a UDP datagram after it expired, or a backend deleted or changed
 * since (a recycled id), so that a UDP flow never keeps going to a deleted endpoint
 * (kube-proxy's stale-conntrack bug). A TCP segment of an expired but otherwise valid flow keeps
 * its backend: choosing again would only earn it a RST from a backend that never saw it. */
static __always_inline struct lb4_backend *lb4_ct_backend(const struct lb4_ct_value *ct,
							  const struct lb4_packet *pkt, __u64 now)
{
	struct lb4_backend *backend;
	__u32 id = ct->backend_id;
	int syn = lb4_is_syn(pkt);

	if (syn && lb4_ct_closing(ct->tx_state, ct->rx_state)) {
		LB_TRACE_FLAG(LB_TRACE_F_CT_CLOSING);
		return NULL;
	}
	if ((syn || pkt->proto != IPPROTO_TCP) && lb4_ct_expired(ct, pkt->proto, now)) {
		LB_TRACE_FLAG(LB_TRACE_F_CT_EXPIRED);
		return NULL;
	}
	backend = lb4_backends.lookup(&id);
	if (!backend || backend->address != ct->nat_address || backend->port != ct->nat_port) {
		LB_TRACE_FLAG(LB_TRACE_F_CT_BACKEND_GONE);
		return NULL;
	}
	return backend;
}

static __always_inline struct lb4_backend *lb4_select_backend(const struct lb4_service_key *frontend,
							      __u16 count, __u32 *backend_id)
{
	struct lb4_service_key key = *frontend;
	struct lb4_service_value *slot;

	/* Uniform over slots 1..count: the modulo bias is below count / 2^32. */
	key.backend_slot = (bpf_get_prandom_u32() % count) + 1;
	LB_TRACE_SET(slot, key.backend_slot);
	slot = lb4_services.lookup(&key);
	if (!slot)
		return NULL;
	*backend_id = slot->backend_id;
	return lb4_backends.lookup(backend_id);
}

/* sessionAffinity: ClientIP. The backend this client's last new connection used, if that was
 * within the timeout and the backend still takes new flows. */
static __always_inline struct lb4_backend *lb4_affinity_backend(const struct lb4_packet *pkt,
								const struct lb4_service_value *svc,
								__u32 *backend_id, __u64 now)
{
	struct lb4_affinity_key key = { .client = pkt->saddr, .service_id = svc->service_id };
	/* svc is a copy on the stack: the frontend may be rewritten meanwhile */
	struct lb4_affinity_value *aff = lb4_affinity.lookup(&key);
	struct lb4_backend *backend;
	__u32 id;

	if (!aff || now - aff->last_used > (__u64)svc->affinity_timeout * 1000000000ULL)
		return NULL;
	id = aff->backend_id;
	backend = lb4_backends.lookup(&id);
	if (!backend || backend->address != aff->address || backend->port != aff->port ||
	    (backend->flags & LB_BACKEND_F_DRAINING))
		return NULL;
	*backend_id = id;
	LB_TRACE_FLAG(LB_TRACE_F_AFFINITY);
	return backend;
}

static __always_inline void lb4_affinity_update(const struct lb4_packet *pkt, __u32 service_id,
						const struct lb4_nat_target *target, __u64 now)
{
#ifndef LB_TRACE
	struct lb4_affinity_key key = { .client = pkt->saddr, .service_id = service_id };
	struct lb4_affinity_value value = {
		.backend_id = target->backend_id, .address = target->address, .port = target->port,
		.last_used = now,
	};

	lb4_affinity.update(&key, &value);
#endif
}

/* Sends a service packet to its backend (DNAT). A pod reaching itself (hairpin) also gets its
 * source rewritten to LB_HAIRPIN_ADDR, since Linux drops a packet from its own address, and the
 * packet goes straight back out of its own link: the stack never sees a flow that exists only
 * between the pod and itself (strict rp_filter would drop LB_HAIRPIN_ADDR coming in by a pod's
 * link, which no route leads back to). */
static __always_inline int lb4_to_backend(struct __ctx_buff *ctx, const struct lb4_packet *pkt,
					  const struct lb4_nat_target *target, const struct lb4_config *cfg,
					  struct lb4_verdict *v)
{
	if (lb4_nat_rewrite(ctx, pkt, LB_NAT_DEST, target->address, target->port) < 0)
		goto failed;
	if (!(target->ct_flags & LB_CT_F_HAIRPIN)) {
		if (target->ct_flags & LB_CT_F_MASQUERADE) {
			LB_TRACE_FLAG(LB_TRACE_F_MASQUERADE);
			lb_count(LB_STAT_MASQUERADE);
			v->mark |= lb4_masq_mark(cfg);
		}
		return CTX_ACT_OK;
	}
	LB_TRACE_FLAG(LB_TRACE_F_HAIRPIN);
	if (lb4_nat_rewrite(ctx, pkt, LB_NAT_SOURCE, bpf_htonl(LB_HAIRPIN_ADDR), pkt->sport) < 0 ||
	    lb_ctx_swap_macs(ctx) < 0)
		goto failed;
	return ctx_redirect_back(ctx);
failed:
	lb_count(LB_STAT_NAT_FAILED);
	return CTX_ACT_DROP;
}

/* No endpoints in the scope: drop (the drop mark, as kube-proxy's DROP for a traffic policy
 * Local without a local endpoint) with LB_SVC_F_DROP, else reject (left to tc by XDP). */
static __always_inline int lb4_no_endpoints(struct __ctx_buff *ctx, const struct lb4_packet *pkt,
					    const struct lb4_service_key *frontend,
					    const struct lb4_service_value *svc, const struct lb4_config *cfg,
					    int origin, struct lb4_verdict *v)
{
	if (!(svc->flags & LB_SVC_F_DROP) && (origin & LB_ORIGIN_XDP)) {
		v->defer = 1;
		return CTX_ACT_OK;
	}
	lb_count(LB_STAT_NO_BACKEND);
	lb_account(svc->service_id, 0, ctx_len(ctx), 0);
	if (!(svc->flags & LB_SVC_F_DROP))
		return lb4_reject(ctx, pkt);
	LB_TRACE_FLAG(LB_TRACE_F_SVC_DROP);
	if ((svc->flags & LB_SVC_F_ETP_LOCAL) && frontend->scope == LB_SCOPE_EXTERNAL)
		lb_count(LB_STAT_DROP_ETP_LOCAL);
	else
		lb_count(LB_STAT_DROP_ITP_LOCAL);
	return lb4_drop(cfg, v);
}

/* A packet to a frontend (`svc`: a stack copy of slot 0 of the scope `frontend` names;
 * `fe_flags`: scope 0's, which say the frontend's type and policies). */
static __always_inline int lb4_service_packet(struct __ctx_buff *ctx, const struct lb4_packet *pkt,
					      const struct lb4_service_key *frontend,
					      const struct lb4_service_value *svc, __u16 fe_flags,
					      const struct lb4_config *cfg, int origin, struct lb4_verdict *v)
{
	struct lb4_ct_key key = {
		.saddr = pkt->saddr, .daddr = pkt->daddr, .sport = pkt->sport,
		.dport = pkt->dport, .proto = pkt->proto, .dir = LB_CT_FORWARD,
	};
	struct lb4_nat_target target = {};
	struct lb4_backend *backend = NULL;
	struct lb4_ct_value *ct;
	__u32 service_id = svc->service_id;
	__u64 now = bpf_ktime_get_ns();
	int new_flow = 0, created, expired;

	LB_TRACE_FLAG(LB_TRACE_F_SERVICE);
	LB_TRACE_SET(service_id, service_id);
	LB_TRACE_SET(count, svc->count);
	ct = lb4_ct.lookup(&key);
	if (ct) {
		LB_TRACE_FLAG(LB_TRACE_F_CT_FOUND);
		LB_TRACE_SET(ct_backend_id, ct->backend_id);
		backend = lb4_ct_backend(ct, pkt, now);
		if (backend) {
			target.address = ct->nat_address;
			target.port = ct->nat_port;
			target.backend_id = ct->backend_id;
			target.ct_flags = ct->flags;
			/* An expired flow's reply entry may have been removed as stale (a SYN-ACK of
			 * the pod's own connection on this tuple, lb4_reply_packet): putting it back is
			 * no eviction. */
			expired = lb4_ct_expired(ct, pkt->proto, now);
			if (lb4_ct_touch(ct, pkt, now, LB_CT_FORWARD) &&
			    lb4_ct_keep_reply(pkt, &target, service_id, now) && !expired)
				lb_count(LB_STAT_CT_EVICTED);
			lb_count(LB_STAT_SVC_CT_HIT);
		} else {
			lb_count(LB_STAT_SVC_RESELECT);
		}
	} else if (pkt->proto == IPPROTO_TCP && !lb4_is_syn(pkt)) {
		/* To a node address (NodePort) or an external IP, this may be the answer to a
		 * connection netfilter masqueraded whose source port happens to be a frontend's:
		 * netfilter's to translate, not a new flow. A ClusterIP is never a masquerade
		 * source: a segment of a forgotten flow is balanced again. */
		if (fe_flags & LB_SVC_F_EXTERNAL_TYPES) {
			lb_count(LB_STAT_PASS_UNTRACKED);
			return CTX_ACT_OK;
		}
		lb_count(LB_STAT_SVC_MIDFLOW_MISS);
	}
	if (!backend) {
		if (svc->count == 0)
			return lb4_no_endpoints(ctx, pkt, frontend, svc, cfg, origin, v);
		if (svc->flags & LB_SVC_F_AFFINITY)
			backend = lb4_affinity_backend(pkt, svc, &target.backend_id, now);
		if (!backend)
			backend = lb4_select_backend(frontend, svc->count, &target.backend_id);
		if (!backend) {
			lb_count(LB_STAT_NO_BACKEND);
			return CTX_ACT_DROP;
		}
		target.address = backend->address;
		target.port = backend->port;
		if (backend->address == pkt->saddr && !(origin & LB_ORIGIN_UPLINK))
			target.ct_flags = LB_CT_F_HAIRPIN;
		else if (lb4_masquerade(cfg, pkt, fe_flags, origin, backend->address))
			target.ct_flags = LB_CT_F_MASQUERADE;
		else
			target.ct_flags = 0;
		created = lb4_ct_create(pkt, &target, service_id, now, ct != NULL);
		if (created < 0)
			lb_count(LB_STAT_CT_FULL);
		if (created == LB_CT_LOST_RACE) {
			lb_count(LB_STAT_SVC_CT_HIT);   /* another CPU's first packet of this flow won */
		} else {
			lb_count(LB_STAT_SVC_NEW_FLOW);
			new_flow = 1;
		}
		if (svc->flags & LB_SVC_F_AFFINITY)
			lb4_affinity_update(pkt, service_id, &target, now);
	}
	LB_TRACE_SET(backend_id, target.backend_id);
	lb_account(service_id, target.backend_id, ctx_len(ctx), new_flow);
	return lb4_to_backend(ctx, pkt, &target, cfg, v);
}

/* loadBalancerSourceRanges: the source matches one of the service's prefixes. */
static __always_inline int lb4_source_allowed(const struct lb4_packet *pkt, __u32 service_id)
{
	struct lb4_source_range_key key = {
		.prefixlen = 64, .service_id = service_id, .address = pkt->saddr,
	};

	return lb4_source_ranges.lookup(&key) != NULL;
}

/* The frontend a packet is addressed to, if any (`*found`), and what happens to it: the
 * source range check (every source, as kube-proxy's KUBE-FW chain), the scope (internal
 * traffic to a frontend with two scopes uses LB_SCOPE_INTERNAL), then the service path. */
static __always_inline int lb4_frontend_packet(struct __ctx_buff *ctx, const struct lb4_packet *pkt,
					       int origin, struct lb4_verdict *v, int *found)
{
	struct lb4_service_key frontend = {
		.address = pkt->daddr, .dport = pkt->dport, .proto = pkt->proto,
		.scope = LB_SCOPE_EXTERNAL,
	};
	struct lb4_service_value service, *svc;
	struct lb4_config *cfg;
	__u16 flags;

	svc = lb4_services.lookup(&frontend);
	if (!svc) {
		*found = 0;
		return CTX_ACT_OK;
	}
	*found = 1;
	/* a copy: the control plane may rewrite the frontend while this packet is handled */
	service = *svc;
	flags = service.flags;
	cfg = lb4_config_get();
	if ((flags & LB_SVC_F_SOURCE_RANGES) && !lb4_source_allowed(pkt, service.service_id)) {
		LB_TRACE_FLAG(LB_TRACE_F_SERVICE | LB_TRACE_F_SOURCE_RANGE_DROP);
		LB_TRACE_SET(service_id, service.service_id);
		lb_count(LB_STAT_DROP_SOURCE_RANGE);
		lb_account(service.service_id, 0, ctx_len(ctx), 0);
		return lb4_drop(cfg, v);
	}
	if ((flags & LB_SVC_F_TWO_SCOPES) && lb4_internal_source(cfg, pkt, origin)) {
		frontend.scope = LB_SCOPE_INTERNAL;
		svc = lb4_services.lookup(&frontend);
		if (svc) {
			LB_TRACE_FLAG(LB_TRACE_F_INTERNAL);
			service = *svc;
		} else {
			frontend.scope = LB_SCOPE_EXTERNAL;   /* not written (yet): scope 0 serves */
		}
	}
	return lb4_service_packet(ctx, pkt, &frontend, &service, flags, cfg, origin, v);
}

/* A packet matching a reply entry is translated only while its flow lives: the forward entry
 * must still exist and name the same backend. Otherwise the reply entry is removed and the
 * packet passed untouched: its forward entry was evicted by the LRU (LB_STAT_CT_EVICTED), or
 * the flow chose another backend since (LB_STAT_STALE_REPLY).
 * An expired flow is judged as the forward path judges it (lb4_ct_backend): a TCP segment
 * without SYN still belongs to it (a FIN retransmitted after both FINs and the closing
 * lifetime, a backend speaking after hours of silence) and is translated, which keeps the flow
 * alive; a SYN-ACK, or a UDP datagram, of an expired flow belongs to something else, say the
 * same client port now talking to the pod directly: passed untouched, the entry removed
 * (LB_STAT_STALE_REPLY). */
static __always_inline int lb4_reply_packet(struct __ctx_buff *ctx, const struct lb4_packet *pkt,
					    struct lb4_ct_key *reply, const struct lb4_ct_value *ct)
{
	int hairpin = ct->flags & LB_CT_F_HAIRPIN;
	struct lb4_ct_key key = {
		.saddr = hairpin ? pkt->saddr : pkt->daddr, .daddr = ct->nat_address,
		.sport = pkt->dport, .dport = ct->nat_port, .proto = pkt->proto,
		.dir = LB_CT_FORWARD,
	};
	__be32 vip = ct->nat_address;
	__be16 vport = ct->nat_port;
	struct lb4_ct_value *flow;
	__u64 now = bpf_ktime_get_ns();

	LB_TRACE_FLAG(LB_TRACE_F_REPLY);
	LB_TRACE_SET(service_id, ct->service_id);
	LB_TRACE_SET(backend_id, ct->backend_id);
	flow = lb4_ct.lookup(&key);
	if (!flow || flow->backend_id != ct->backend_id) {
		lb4_ct_delete(reply);
		lb_count(flow ? LB_STAT_STALE_REPLY : LB_STAT_CT_EVICTED);
		return CTX_ACT_OK;
	}
	if ((pkt->proto != IPPROTO_TCP || (pkt->tcp_flags & LB_TCP_SYN)) &&
	    lb4_ct_expired(flow, pkt->proto, now)) {
		LB_TRACE_FLAG(LB_TRACE_F_CT_EXPIRED);
		lb4_ct_delete(reply);
		lb_count(LB_STAT_STALE_REPLY);
		return CTX_ACT_OK;
	}
	lb4_ct_touch(flow, pkt, now, LB_CT_REPLY);
	if (lb4_nat_rewrite(ctx, pkt, LB_NAT_SOURCE, vip, vport) < 0)
		goto failed;
	if (!hairpin) {
		lb_count(LB_STAT_REVNAT);
		return CTX_ACT_OK;
	}
	/* to LB_HAIRPIN_ADDR: back to the pod itself, out of the link the reply came in by */
	LB_TRACE_FLAG(LB_TRACE_F_HAIRPIN);
	if (lb4_nat_rewrite(ctx, pkt, LB_NAT_DEST, pkt->saddr, pkt->dport) < 0 ||
	    lb_ctx_swap_macs(ctx) < 0)
		goto failed;
	lb_count(LB_STAT_REVNAT);
	return ctx_redirect_back(ctx);
failed:
	lb_count(LB_STAT_NAT_FAILED);
	return CTX_ACT_DROP;
}

/* A reply of a tracked flow is translated back to the service address; the rest passes. */
static __always_inline int lb4_reply_or_pass(struct __ctx_buff *ctx, const struct lb4_packet *pkt)
{
	struct lb4_ct_key reply = {
		.saddr = pkt->saddr, .daddr = pkt->daddr, .sport = pkt->sport,
		.dport = pkt->dport, .proto = pkt->proto, .dir = LB_CT_REPLY,
	};
	struct lb4_ct_value *ct = lb4_ct.lookup(&reply);

	if (ct)
		return lb4_reply_packet(ctx, pkt, &reply, ct);
	lb_count(LB_STAT_PASS_NO_SERVICE);
	return CTX_ACT_OK;
}

#endif /* LBCTL_LB_H */

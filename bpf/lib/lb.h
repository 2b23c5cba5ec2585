/* lb.h: the load balancer's decisions, for any program: a packet to a service goes to its
 * flow's backend or to one chosen now (uniform random among the slots, as kube-proxy's
 * `statistic --mode random` chains), sessionAffinity, hairpin; a reply goes back as from the
 * service. Needs the maps, stats.h, conntrack.h, nat.h and reject.h. */
#ifndef LBCTL_LB_H
#define LBCTL_LB_H

#include "lib/maglev.h"

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
					  const struct lb4_nat_target *target)
{
	if (lb4_nat_rewrite(ctx, pkt, LB_NAT_DEST, target->address, target->port) < 0)
		goto failed;
	if (!(target->ct_flags & LB_CT_F_HAIRPIN))
		return CTX_ACT_OK;
	LB_TRACE_FLAG(LB_TRACE_F_HAIRPIN);
	if (lb4_nat_rewrite(ctx, pkt, LB_NAT_SOURCE, bpf_htonl(LB_HAIRPIN_ADDR), pkt->sport) < 0 ||
	    lb_ctx_swap_macs(ctx) < 0)
		goto failed;
	return ctx_redirect_back(ctx);
failed:
	lb_count(LB_STAT_NAT_FAILED);
	return CTX_ACT_DROP;
}

/* A packet to a frontend (`svc`: a stack copy of its slot 0). */
static __always_inline int lb4_service_packet(struct __ctx_buff *ctx, const struct lb4_packet *pkt,
					      const struct lb4_service_key *frontend,
					      const struct lb4_service_value *svc)
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
		lb_count(LB_STAT_SVC_MIDFLOW_MISS);
	}
	if (!backend) {
		if (svc->count == 0) {
			lb_count(LB_STAT_NO_BACKEND);
			lb_account(service_id, 0, ctx_len(ctx), 0);
			if (svc->flags & LB_SVC_F_DROP) {
				LB_TRACE_FLAG(LB_TRACE_F_SVC_DROP);
				return CTX_ACT_DROP;
			}
			return lb4_reject(ctx, pkt);
		}
		if (svc->flags & LB_SVC_F_AFFINITY)
			backend = lb4_affinity_backend(pkt, svc, &target.backend_id, now);
		if (!backend && (svc->flags & LB_SVC_F_MAGLEV))   /* lib/maglev.h */
			backend = lb4_maglev_backend(pkt, frontend, service_id, &target.backend_id);
		if (!backend)
			backend = lb4_select_backend(frontend, svc->count, &target.backend_id);
		if (!backend) {
			lb_count(LB_STAT_NO_BACKEND);
			return CTX_ACT_DROP;
		}
		target.address = backend->address;
		target.port = backend->port;
		target.ct_flags = backend->address == pkt->saddr ? LB_CT_F_HAIRPIN : 0;
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
	return lb4_to_backend(ctx, pkt, &target);
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

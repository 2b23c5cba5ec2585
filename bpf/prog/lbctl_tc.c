/* lbctl_tc.c: ClusterIP load balancing at tc ingress of the links pod traffic enters the
 * node by (host side of pod veths).
 *
 *   client -> VIP:port     service hit: pick a backend (uniform random among the slots, as
 *                          kube-proxy's `statistic --mode random` chains), remember it in
 *                          lb4_ct, DNAT to the backend.
 *   backend -> client      reply of a tracked flow: rewrite the source back to VIP:port.
 *   anything else          passed untouched (TC_ACT_OK), counted in lb_global_stats.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <linux/stddef.h>

#include "lbctl_shared.h"
#include "lbctl_maps.h"
#include "lib/parse.h"
#include "lib/nat.h"

static __always_inline void lb_count(__u32 index)
{
	__u64 *value = lb_global_stats.lookup(&index);

	if (value)
		*value += 1;
}

static __always_inline void lb_stats_add(struct lb_stats *stats, __u32 bytes, int new_flow)
{
	if (!stats)
		return;
	stats->packets += 1;
	stats->bytes += bytes;
	stats->flows += new_flow;
}

/* How long an entry lives in its state, in ns. */
static __always_inline __u64 lb_ct_lifetime(__u8 proto, __u8 flags)
{
	__u64 seconds = LB_CT_LIFETIME_NONTCP;

	if (proto == IPPROTO_TCP) {
		if (flags & LB_CT_F_CLOSING)
			seconds = LB_CT_LIFETIME_CLOSING;
		else if (flags & LB_CT_F_SEEN_REPLY)
			seconds = LB_CT_LIFETIME_TCP;
		else
			seconds = LB_CT_LIFETIME_SYN;
	}
	return seconds * 1000000000ULL;
}

/* Records what a packet says about its flow in the forward entry (a reply seen, a FIN from
 * either side, a RST) and extends the entry's life. The map is written when the state changes,
 * else at most once per LB_CT_REFRESH_NS, so established flows do not dirty a shared cache
 * line on every packet. A half-closed flow (one FIN) stays established: the other side may
 * go on sending for long. */
static __always_inline void lb_ct_touch(struct lb4_ct_value *ct, const struct lb4_packet *pkt,
					__u64 now, int from_backend)
{
	__u8 flags = ct->flags;

	if (from_backend)
		flags |= LB_CT_F_SEEN_REPLY;
	if (pkt->tcp_flags & LB_TCP_FIN)
		flags |= from_backend ? LB_CT_F_FIN_BACKEND : LB_CT_F_FIN_CLIENT;
	if ((pkt->tcp_flags & LB_TCP_RST) ||
	    ((flags & LB_CT_F_FIN_CLIENT) && (flags & LB_CT_F_FIN_BACKEND)))
		flags |= LB_CT_F_CLOSING;
	if (flags != ct->flags || now - ct->refreshed > LB_CT_REFRESH_NS) {
		ct->flags = flags;
		ct->expires = now + lb_ct_lifetime(pkt->proto, flags);
		ct->refreshed = now;
	}
}

/* A tracked flow keeps its backend while that backend still exists with the same address:
 * a deleted endpoint (or a recycled id) makes the flow choose again, so UDP flows never keep
 * going to a deleted backend (kube-proxy's stale-conntrack bug). A new flow starts with a SYN
 * on a closed tuple, or with a SYN or UDP datagram after the entry expired; a TCP segment of
 * an expired but otherwise valid flow keeps its backend (choosing again would only earn it a
 * RST from a backend that never saw the connection). */
static __always_inline struct lb4_backend *lb_ct_backend(struct lb4_ct_value *ct,
							const struct lb4_packet *pkt, __u64 now)
{
	struct lb4_backend *backend;
	__u32 id = ct->backend_id;
	int syn = (pkt->tcp_flags & (LB_TCP_SYN | LB_TCP_ACK)) == LB_TCP_SYN;

	if (syn && (ct->flags & LB_CT_F_CLOSING))
		return NULL;
	if (now > ct->expires && (syn || pkt->proto != IPPROTO_TCP))
		return NULL;
	backend = lb4_backends.lookup(&id);
	if (!backend || backend->address != ct->nat_address || backend->port != ct->nat_port)
		return NULL;
	return backend;
}

static __always_inline struct lb4_backend *lb_select_backend(const struct lb4_service_key *frontend,
							    __u16 count, __u32 *backend_id)
{
	struct lb4_service_key key = *frontend;
	struct lb4_service_value *slot;

	/* Uniform over slots 1..count: the modulo bias is below count / 2^32. */
	key.backend_slot = (bpf_get_prandom_u32() % count) + 1;
	slot = lb4_services.lookup(&key);
	if (!slot)
		return NULL;
	*backend_id = slot->backend_id;
	return lb4_backends.lookup(backend_id);
}

/* sessionAffinity: ClientIP. The backend this client's last new connection used, if that was
 * within the timeout and the backend still takes new flows. */
static __always_inline struct lb4_backend *lb_affinity_backend(const struct lb4_packet *pkt,
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
	return backend;
}

static __always_inline void lb_affinity_update(const struct lb4_packet *pkt, __u32 service_id,
					       __u32 backend_id, const struct lb4_backend *backend,
					       __u64 now)
{
	struct lb4_affinity_key key = { .client = pkt->saddr, .service_id = service_id };
	struct lb4_affinity_value value = {
		.backend_id = backend_id, .address = backend->address, .port = backend->port,
		.last_used = now,
	};

	lb4_affinity.update(&key, &value);
}

static __always_inline int lb_ct_create(const struct lb4_packet *pkt, const struct lb4_backend *backend,
					__u32 backend_id, __u32 service_id, __u64 now, __u8 flags)
{
	struct lb4_ct_key key = {};
	struct lb4_ct_value value = {};

	value.expires = now + lb_ct_lifetime(pkt->proto, flags);
	value.refreshed = now;
	value.service_id = service_id;
	value.backend_id = backend_id;
	value.flags = flags;

	/* The reply entry first: once the forward entry exists, replies must be translatable. */
	key.saddr = backend->address;
	key.daddr = (flags & LB_CT_F_HAIRPIN) ? bpf_htonl(LB_HAIRPIN_ADDR) : pkt->saddr;
	key.sport = backend->port;
	key.dport = pkt->sport;
	key.proto = pkt->proto;
	key.dir = LB_CT_REPLY;
	value.nat_address = pkt->daddr;
	value.nat_port = pkt->dport;
	if (lb4_ct.update(&key, &value) < 0)
		return -1;

	key.saddr = pkt->saddr;
	key.daddr = pkt->daddr;
	key.sport = pkt->sport;
	key.dport = pkt->dport;
	key.dir = LB_CT_FORWARD;
	value.nat_address = backend->address;
	value.nat_port = backend->port;
	return lb4_ct.update(&key, &value);
}

static __always_inline int lb_service_packet(struct __sk_buff *skb, const struct lb4_packet *pkt,
					     const struct lb4_service_key *frontend,
					     const struct lb4_service_value *svc)
{
	struct lb4_ct_key key = {
		.saddr = pkt->saddr, .daddr = pkt->daddr, .sport = pkt->sport,
		.dport = pkt->dport, .proto = pkt->proto, .dir = LB_CT_FORWARD,
	};
	struct lb4_backend *backend = NULL, target;
	struct lb4_ct_value *ct;
	__u8 ct_flags = 0;
	__u32 backend_id = 0;
	__u32 service_id = svc->service_id;
	__u64 now = bpf_ktime_get_ns();
	int new_flow = 0;

	ct = lb4_ct.lookup(&key);
	if (ct) {
		backend = lb_ct_backend(ct, pkt, now);
		if (backend) {
			backend_id = ct->backend_id;
			ct_flags = ct->flags;
			lb_ct_touch(ct, pkt, now, 0);
			lb_count(LB_STAT_SVC_CT_HIT);
		} else {
			lb_count(LB_STAT_SVC_RESELECT);
		}
	}
	if (!backend) {
		if (svc->count == 0) {
			lb_count(LB_STAT_NO_BACKEND);
			lb_stats_add(lb_service_stats.lookup(&service_id), skb->len, 0);
			if (svc->flags & LB_SVC_F_DROP)
				return TC_ACT_SHOT;
			return pkt->proto == IPPROTO_TCP ? lb_reject_tcp(skb, pkt)
							 : lb_reject_udp(skb, pkt);
		}
		if (svc->flags & LB_SVC_F_AFFINITY)
			backend = lb_affinity_backend(pkt, svc, &backend_id, now);
		if (!backend)
			backend = lb_select_backend(frontend, svc->count, &backend_id);
		if (!backend) {
			lb_count(LB_STAT_NO_BACKEND);
			return TC_ACT_SHOT;
		}
		if (svc->flags & LB_SVC_F_AFFINITY)
			lb_affinity_update(pkt, service_id, backend_id, backend, now);
		if (backend->address == pkt->saddr)
			ct_flags = LB_CT_F_HAIRPIN;
		if (lb_ct_create(pkt, backend, backend_id, svc->service_id, now, ct_flags) < 0)
			lb_count(LB_STAT_CT_FULL);
		lb_count(LB_STAT_SVC_NEW_FLOW);
		new_flow = 1;
	}
	target = *backend;  /* one read of a map value another CPU's update may change */
	lb_stats_add(lb_service_stats.lookup(&service_id), skb->len, new_flow);
	lb_stats_add(lb_backend_stats.lookup(&backend_id), skb->len, new_flow);
	if (lb_nat_rewrite(skb, pkt, 0, target.address, target.port) < 0 ||
	    ((ct_flags & LB_CT_F_HAIRPIN) &&
	     lb_nat_rewrite(skb, pkt, 1, bpf_htonl(LB_HAIRPIN_ADDR), pkt->sport) < 0)) {
		lb_count(LB_STAT_NAT_FAILED);
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}

/* A packet matching a reply entry is translated only while its flow lives: the forward entry
 * must still exist, name the same backend and not have expired. Otherwise the entry is a
 * leftover of a finished flow and this packet belongs to something else (say the same client
 * port now talking to the pod directly): it is passed untouched and the leftover removed. */
static __always_inline int lb_reply_packet(struct __sk_buff *skb, const struct lb4_packet *pkt,
					   struct lb4_ct_key *reply, struct lb4_ct_value *ct)
{
	int hairpin = ct->flags & LB_CT_F_HAIRPIN;
	struct lb4_ct_key key = {
		.saddr = hairpin ? pkt->saddr : pkt->daddr, .daddr = ct->nat_address,
		.sport = pkt->dport, .dport = ct->nat_port, .proto = pkt->proto,
		.dir = LB_CT_FORWARD,
	};
	struct lb4_ct_value *flow = lb4_ct.lookup(&key);
	__u64 now = bpf_ktime_get_ns();

	if (!flow || flow->backend_id != ct->backend_id || now > flow->expires) {
		lb4_ct.delete(reply);
		lb_count(LB_STAT_STALE_REPLY);
		return TC_ACT_OK;
	}
	lb_ct_touch(flow, pkt, now, 1);
	if (ct->expires != flow->expires)
		ct->expires = flow->expires;
	/* hairpin: the reply goes to LB_HAIRPIN_ADDR; send it back to the pod itself */
	if (lb_nat_rewrite(skb, pkt, 1, ct->nat_address, ct->nat_port) < 0 ||
	    (hairpin && lb_nat_rewrite(skb, pkt, 0, pkt->saddr, pkt->dport) < 0)) {
		lb_count(LB_STAT_NAT_FAILED);
		return TC_ACT_SHOT;
	}
	lb_count(LB_STAT_REVNAT);
	return TC_ACT_OK;
}

/* Headers the parser reads: Ethernet, IPv4 with options, TCP. */
#define LB_HEADERS_MAX (sizeof(struct ethhdr) + 60 + sizeof(struct tcphdr))

/* Makes the headers direct-readable when the skb carries them outside its linear part (GRO'ed
 * or fragmented buffers from some drivers); a no-op for the usual linear veth packet. */
static __always_inline void lb_pull_headers(struct __sk_buff *skb)
{
	__u32 linear = skb->data_end - skb->data;
	__u32 want = skb->len < LB_HEADERS_MAX ? skb->len : LB_HEADERS_MAX;

	if (linear < want)
		bpf_skb_pull_data(skb, want);
}

/* Replies of tracked flows are translated back to the service address; the rest passes. */
static __always_inline int lb_reply_or_pass(struct __sk_buff *skb, const struct lb4_packet *pkt)
{
	struct lb4_ct_key reply = {
		.saddr = pkt->saddr, .daddr = pkt->daddr, .sport = pkt->sport,
		.dport = pkt->dport, .proto = pkt->proto, .dir = LB_CT_REPLY,
	};
	struct lb4_ct_value *ct = lb4_ct.lookup(&reply);

	if (ct)
		return lb_reply_packet(skb, pkt, &reply, ct);
	lb_count(LB_STAT_PASS_NO_SERVICE);
	return TC_ACT_OK;
}

/* Ingress of a pod link (pod -> node): requests to services, and replies of local backends. */
int lb_tc_ingress(struct __sk_buff *skb)
{
	struct lb4_packet pkt = {};
	struct lb4_service_key frontend = {};
	struct lb4_service_value *svc;
	int verdict;

	lb_pull_headers(skb);
	verdict = lb_parse(skb, &pkt);
	if (verdict != LB_PARSE_OK) {
		lb_count(verdict);
		return TC_ACT_OK;
	}
	frontend.address = pkt.daddr;
	frontend.dport = pkt.dport;
	frontend.proto = pkt.proto;
	frontend.scope = LB_SCOPE_EXTERNAL;
	svc = lb4_services.lookup(&frontend);
	if (svc) {
		/* a copy: the control plane may rewrite the frontend while this packet is handled */
		struct lb4_service_value service = *svc;

		return lb_service_packet(skb, &pkt, &frontend, &service);
	}
	return lb_reply_or_pass(skb, &pkt);
}

/* Egress of a pod link (node -> pod): only replies can need translating here (a backend on
 * another node answered through the uplink); nothing addressed to a service reaches a pod,
 * so the service lookup is skipped. Odd packets are not counted twice. */
int lb_tc_egress(struct __sk_buff *skb)
{
	struct lb4_packet pkt = {};

	lb_pull_headers(skb);
	if (lb_parse(skb, &pkt) != LB_PARSE_OK)
		return TC_ACT_OK;
	return lb_reply_or_pass(skb, &pkt);
}

/* conntrack.h: the flow table (lb4_ct), two entries per flow.
 *
 *   forward {client, VIP, cport, vport}   -> the backend chosen, and the flow's state
 *   reply   {backend, client, bport, cport} -> the VIP:port to put back as the source
 *
 * Both directions of a flow update its forward entry, usually from two CPUs at once: each
 * direction has a state byte of its own (tx_state, rx_state; see lbctl_shared.h) and the
 * lifetime is derived from both when it is read, so no update of one direction can undo the
 * other's. Creation races are settled by BPF_NOEXIST (lb4_ct_create). */
#ifndef LBCTL_CONNTRACK_H
#define LBCTL_CONNTRACK_H

#define LB_EEXIST 17                   /* <errno.h>, as the map helpers return it negated */

#define LB_CT_CREATED 0
#define LB_CT_LOST_RACE 1

/* Where a service packet goes: its flow's backend (or the one just chosen). A stack copy, read
 * once from a map value another CPU may rewrite meanwhile. */
struct lb4_nat_target {
	__be32 address;
	__be16 port;
	__u8 ct_flags;                 /* LB_CT_F_* of the flow */
	__u8 pad;
	__u32 backend_id;
};

/* What this packet says about its side of the flow. */
static __always_inline __u8 lb4_ct_seen(const struct lb4_packet *pkt)
{
	__u8 seen = LB_CT_SEEN_PKT;

	if (pkt->tcp_flags & LB_TCP_FIN)
		seen |= LB_CT_SEEN_FIN;
	if (pkt->tcp_flags & LB_TCP_RST)
		seen |= LB_CT_SEEN_RST;
	return seen;
}

/* RST from either side, or FIN from both: a new SYN on this tuple is a new flow. A half-closed
 * flow (one FIN) stays established: the other side may go on sending for long. */
static __always_inline int lb4_ct_closing(__u8 tx, __u8 rx)
{
	return ((tx | rx) & LB_CT_SEEN_RST) || (tx & rx & LB_CT_SEEN_FIN);
}

/* How long an entry lives after its last packet, in ns, from the state of both sides. */
static __always_inline __u64 lb4_ct_lifetime(__u8 proto, __u8 tx, __u8 rx)
{
	__u64 seconds = LB_CT_LIFETIME_NONTCP;

	if (proto == IPPROTO_TCP) {
		if (lb4_ct_closing(tx, rx))
			seconds = LB_CT_LIFETIME_CLOSING;
		else if (rx & LB_CT_SEEN_PKT)
			seconds = LB_CT_LIFETIME_TCP;
		else
			seconds = LB_CT_LIFETIME_SYN;
	}
	return seconds * 1000000000ULL;
}

static __always_inline int lb4_ct_expired(const struct lb4_ct_value *ct, __u8 proto, __u64 now)
{
	return now > ct->last_seen + lb4_ct_lifetime(proto, ct->tx_state, ct->rx_state);
}

/* Records what a packet says about its flow in the forward entry and keeps the flow alive.
 * `dir` LB_CT_FORWARD (a client packet) writes tx_state only, LB_CT_REPLY rx_state only. A
 * byte is written only when it gains a bit, last_seen at most once per LB_CT_REFRESH_NS, so an
 * established flow does not dirty a shared cache line on every packet. last_seen is the one
 * field both directions write, and both write "now": losing one of two such writes is free.
 * Returns 1 when last_seen was written (a refresh), else 0. */
static __always_inline int lb4_ct_touch(struct lb4_ct_value *ct, const struct lb4_packet *pkt,
					__u64 now, int dir)
{
#ifndef LB_TRACE
	__u8 seen = lb4_ct_seen(pkt);

	if (dir == LB_CT_FORWARD) {
		__u8 tx = ct->tx_state;

		if ((tx | seen) != tx)
			ct->tx_state = tx | seen;
	} else {
		__u8 rx = ct->rx_state;

		if ((rx | seen) != rx)
			ct->rx_state = rx | seen;
	}
	if (now > ct->last_seen + LB_CT_REFRESH_NS) {
		ct->last_seen = now;
		return 1;
	}
#endif
	return 0;
}

/* The reply entry's key of the flow a client packet `pkt` opens to `target`. */
static __always_inline void lb4_ct_reply_key(struct lb4_ct_key *reply, const struct lb4_packet *pkt,
					     const struct lb4_nat_target *target)
{
	reply->saddr = target->address;
	reply->daddr = (target->ct_flags & LB_CT_F_HAIRPIN) ? bpf_htonl(LB_HAIRPIN_ADDR) : pkt->saddr;
	reply->sport = target->port;
	reply->dport = pkt->sport;
	reply->proto = pkt->proto;
	reply->dir = LB_CT_REPLY;
}

/* The two entries of a flow live in one LRU and are evicted independently. Replies look up
 * both, keeping both recent; a flow whose backend is silent for long keeps its forward entry
 * recent only. So, once per refresh (a second at most), the forward path looks its reply entry
 * up as well (that marks it recently used) and puts it back if the LRU took it: otherwise the
 * backend's next answer would reach the client untranslated. Returns 1 if it was put back. */
static __always_inline int lb4_ct_keep_reply(const struct lb4_packet *pkt,
					     const struct lb4_nat_target *target,
					     __u32 service_id, __u64 now)
{
#ifndef LB_TRACE
	struct lb4_ct_key reply = {};
	struct lb4_ct_value value = {};

	/* everything from `target`, the caller's copy: the shared forward entry may have been
	 * replaced since, and a reply entry keyed to one backend must not carry another's id */
	lb4_ct_reply_key(&reply, pkt, target);
	if (lb4_ct.lookup(&reply))
		return 0;
	value.nat_address = pkt->daddr;
	value.nat_port = pkt->dport;
	value.flags = target->ct_flags;
	value.backend_id = target->backend_id;
	value.service_id = service_id;
	value.last_seen = now;
	return lb4_ct.insert(&reply, &value) == 0;
#else
	return 0;
#endif
}

/* Records a flow: the reply entry first, so that the backend's answer is translatable as soon
 * as the forward entry exists, then the forward entry.
 *
 * A new flow's forward entry is created only if none exists (BPF_NOEXIST): when the first
 * packets of one flow are handled on two CPUs at once, both choose a backend and the entry that
 * lands first wins. The other CPU gets LB_CT_LOST_RACE, with `target` set to the winner's
 * backend (where its packet must go too); it removes its own reply entry, unless that names the
 * same backend and so is the winner's as well. A flow choosing again (`replace`: its backend
 * left, a SYN on a closed tuple, an expired entry) overwrites its entry (BPF_ANY): not settled
 * yet, two CPUs choosing again at once for one flow leave the last writer's choice, the other
 * packet having gone to its own.
 * Returns LB_CT_CREATED, LB_CT_LOST_RACE, or -1 (the table refused the entry). */
static __always_inline int lb4_ct_create(const struct lb4_packet *pkt, struct lb4_nat_target *target,
					 __u32 service_id, __u64 now, int replace)
{
#ifndef LB_TRACE
	struct lb4_ct_key reply = {}, forward = {};
	struct lb4_ct_value value = {};
	struct lb4_ct_value *winner;
	int err, reply_failed;

	value.backend_id = target->backend_id;
	value.service_id = service_id;
	value.flags = target->ct_flags;
	value.tx_state = lb4_ct_seen(pkt);
	value.last_seen = now;

	lb4_ct_reply_key(&reply, pkt, target);
	value.nat_address = pkt->daddr;
	value.nat_port = pkt->dport;
	reply_failed = lb4_ct.update(&reply, &value) < 0;

	forward.saddr = pkt->saddr;
	forward.daddr = pkt->daddr;
	forward.sport = pkt->sport;
	forward.dport = pkt->dport;
	forward.proto = pkt->proto;
	forward.dir = LB_CT_FORWARD;
	value.nat_address = target->address;
	value.nat_port = target->port;
	if (reply_failed) {
		/* No forward entry without its reply entry; but another CPU may have created the
		 * flow meanwhile, and then this packet goes where the winner's went. (A flow
		 * choosing again has its old entry there: no winner to follow.) */
		if (replace)
			return -1;
		winner = lb4_ct.lookup(&forward);
		if (!winner)
			return -1;
		goto lost;
	}
	/* two statements: bcc rewrites map calls, not a conditional expression choosing one */
	if (replace)
		err = lb4_ct.update(&forward, &value);
	else
		err = lb4_ct.insert(&forward, &value);
	if (err != -LB_EEXIST)
		return err < 0 ? -1 : LB_CT_CREATED;

	winner = lb4_ct.lookup(&forward);
	if (!winner)   /* evicted or deleted in between: this packet's choice stands after all */
		return lb4_ct.update(&forward, &value) < 0 ? -1 : LB_CT_CREATED;
lost:
	if (winner->nat_address != target->address || winner->nat_port != target->port)
		lb4_ct.delete(&reply);
	target->address = winner->nat_address;
	target->port = winner->nat_port;
	target->backend_id = winner->backend_id;
	target->ct_flags = winner->flags;
	return LB_CT_LOST_RACE;
#else
	return LB_CT_CREATED;
#endif
}

static __always_inline void lb4_ct_delete(struct lb4_ct_key *key)
{
#ifndef LB_TRACE
	lb4_ct.delete(key);
#endif
}

#endif /* LBCTL_CONNTRACK_H */

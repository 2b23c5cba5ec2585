/* maglev.h: Maglev consistent hashing (Eisenbud et al., NSDI 2016), a per-service option.
 *
 * A frontend with LB_SVC_F_MAGLEV has a table in lb4_maglev: M slots (M prime) filled by the
 * control plane (lbctl/datapath/ebpf/maglev.py) so that every backend holds about M/N of them
 * and a change of one backend moves about 1/N of the slots. A new flow takes the slot its
 * 5-tuple hashes to. The hash is jhash with a fixed seed over the tuple as numbers (host
 * order), so two nodes with the same backends send the same flow to the same backend: a flow
 * moved by ECMP or a load balancer in front to another node keeps its backend, and the
 * table is the same on every architecture. Needs the maps and parse.h. */
#ifndef LBCTL_MAGLEV_H
#define LBCTL_MAGLEV_H

/* Bob Jenkins' lookup3 final mix, the kernel's jhash_3words (include/linux/jhash.h); the
 * Python model (maglev.flow_hash) computes the same numbers. */
static __always_inline __u32 lb_rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> (32 - shift));
}

static __always_inline __u32 lb_jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	initval += 0xdeadbeef + (3 << 2);
	a += initval;
	b += initval;
	c += initval;
	c ^= b; c -= lb_rol32(b, 14);
	a ^= c; a -= lb_rol32(c, 11);
	b ^= a; b -= lb_rol32(a, 25);
	c ^= b; c -= lb_rol32(b, 16);
	a ^= c; a -= lb_rol32(c, 4);
	b ^= a; b -= lb_rol32(a, 14);
	c ^= b; c -= lb_rol32(b, 24);
	return c;
}

/* The flow's hash: source address, both ports and the protocol. The destination is the
 * frontend, the same for every flow of one table. */
static __always_inline __u32 lb4_maglev_hash(const struct lb4_packet *pkt)
{
	__u32 ports = ((__u32)bpf_ntohs(pkt->sport) << 16) | bpf_ntohs(pkt->dport);

	return lb_jhash_3words(bpf_ntohl(pkt->saddr), ports, pkt->proto, LB_MAGLEV_HASH_SEED);
}

/* The backend the frontend's Maglev table gives this flow, or NULL (no table: the caller
 * falls back to a uniform random slot; the control plane writes the table before it sets
 * LB_SVC_F_MAGLEV, so that happens only if the table was removed behind its back). */
static __always_inline struct lb4_backend *lb4_maglev_backend(const struct lb4_packet *pkt,
							      const struct lb4_service_key *frontend,
							      __u32 service_id, __u32 *backend_id)
{
	struct lb4_maglev_key key = { .service_id = service_id, .scope = frontend->scope };
	__u32 zero = 0, index, *size, *id;
	void *table = lb4_maglev.lookup(&key);

	if (!table)
		return NULL;
	size = bpf_map_lookup_elem(table, &zero);
	if (!size || *size == 0)
		return NULL;
	index = 1 + lb4_maglev_hash(pkt) % *size;
	id = bpf_map_lookup_elem(table, &index);
	if (!id)
		return NULL;
	*backend_id = *id;
	return lb4_backends.lookup(backend_id);
}

#endif /* LBCTL_MAGLEV_H */

/* nat.h: address/port rewrites with incremental checksum updates, through the context's
 * wrappers (ctx/skb.h, ctx/xdp.h). */
#ifndef LBCTL_NAT_H
#define LBCTL_NAT_H

#define LB4_SADDR_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, saddr))
#define LB4_DADDR_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, daddr))
#define LB4_IP_CSUM_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, check))

/* Which end of the packet a rewrite changes. */
#define LB_NAT_DEST 0                  /* DNAT: client -> VIP becomes client -> backend */
#define LB_NAT_SOURCE 1                /* reverse NAT: backend -> client becomes VIP -> client */

static __always_inline __u32 lb4_l4_csum_off(const struct lb4_packet *pkt)
{
	return pkt->l4_off + (pkt->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
							: offsetof(struct udphdr, check));
}

/* XDP: whether the L4 checksum field holds the pseudo-header sum (a CHECKSUM_PARTIAL frame,
 * see ctx/xdp.h) rather than a checksum. Called once per packet, after parsing. */
static __always_inline int lb4_csum_partial(struct __ctx_buff *ctx, const struct lb4_packet *pkt)
{
#if CTX_DIRECT_CSUM
	void *data = ctx_data(ctx);
	__u16 *field;
	__u32 off = lb4_l4_csum_off(pkt);
	/* the pseudo header's words as they lie in memory: addresses, {0, proto}, L4 length */
	__u32 sum = lb_csum_words(pkt->saddr, 4) + lb_csum_words(pkt->daddr, 4) +
		    bpf_htons(pkt->proto) + bpf_htons(pkt->ip_len - pkt->ihl);

	if (off > 0xffff)
		return 0;
	field = data + off;
	if ((void *)(field + 1) > ctx_data_end(ctx) || *field == 0)
		return 0;
	return *field == (__u16)~lb_csum_fold(sum);
#else
	return 0;
#endif
}

/* Rewrites one end of the packet: the address in the IP header, the port in the L4 header, and
 * the checksums they feed (IP header; L4, whose pseudo header holds the address). The skb
 * helpers cope with CHECKSUM_PARTIAL skbs from veths; BPF_F_MARK_MANGLED_0 keeps a zero UDP
 * checksum ("none") zero. `pkt` keeps the addresses the packet arrived with. */
static __always_inline int lb4_nat_rewrite(struct __ctx_buff *ctx, const struct lb4_packet *pkt,
					   int which, __be32 new_addr, __be16 new_port)
{
	__be32 old_addr = which == LB_NAT_SOURCE ? pkt->saddr : pkt->daddr;
	__be16 old_port = which == LB_NAT_SOURCE ? pkt->sport : pkt->dport;
	__u32 addr_off = which == LB_NAT_SOURCE ? LB4_SADDR_OFF : LB4_DADDR_OFF;
	__u32 port_off = pkt->l4_off + (which == LB_NAT_SOURCE ? 0 : 2);
	__u32 csum_off = lb4_l4_csum_off(pkt);
	__u64 mangled = pkt->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (pkt->csum_partial)
		mangled |= LB_CSUM_F_PARTIAL;

	if (ctx_l4_csum_replace(ctx, csum_off, old_addr, new_addr,
				mangled | BPF_F_PSEUDO_HDR | sizeof(new_addr)) < 0)
		return -1;
	if (old_port != new_port &&
	    ctx_l4_csum_replace(ctx, csum_off, old_port, new_port, mangled | sizeof(new_port)) < 0)
		return -1;
	if (ctx_l3_csum_replace(ctx, LB4_IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) < 0)
		return -1;
	if (ctx_store_bytes(ctx, addr_off, &new_addr, sizeof(new_addr)) < 0)
		return -1;
	if (old_port != new_port && ctx_store_bytes(ctx, port_off, &new_port, sizeof(new_port)) < 0)
		return -1;
	return 0;
}

/* Turns the Ethernet header around, for a packet sent back out of the link it came in by. */
static __always_inline void lb_swap_macs(struct ethhdr *eth)
{
	__u8 tmp[ETH_ALEN];

	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
}

/* The same, on the packet in the context; -1 if it has no Ethernet header. */
static __always_inline int lb_ctx_swap_macs(struct __ctx_buff *ctx)
{
	struct ethhdr *eth = ctx_data(ctx);

	if ((void *)(eth + 1) > ctx_data_end(ctx))
		return -1;
	lb_swap_macs(eth);
	return 0;
}

#endif /* LBCTL_NAT_H */

/* reject.h: kube-proxy REJECTs traffic for a service without endpoints; so do we, answering in
 * place and sending the answer back out of the interface it came in by:
 *   TCP: a RST (RFC 9293 3.10.7.1, as netfilter's nf_send_reset builds it);
 *   UDP: ICMP port unreachable quoting the offending header, from the service address.
 * Only plain 20-byte IP headers are answered; anything else is dropped. */
#ifndef LBCTL_REJECT_H
#define LBCTL_REJECT_H

static __always_inline void lb4_fill_ip(struct iphdr *ip, __be32 saddr, __be32 daddr, __u8 proto,
					__u16 tot_len)
{
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(tot_len);
	ip->id = 0;
	ip->frag_off = bpf_htons(0x4000); /* DF */
	ip->ttl = 64;
	ip->protocol = proto;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = 0;
	ip->check = lb4_ip_csum(ip);
}

/* The TCP header behind an Ethernet and a 20-byte IP header, or NULL if the packet is shorter.
 * Callers derive the IP and Ethernet headers from it: the bounds check covers them too. */
static __always_inline struct tcphdr *lb4_tcp_header(struct __ctx_buff *ctx)
{
	struct tcphdr *tcp = ctx_data(ctx) + sizeof(struct ethhdr) + sizeof(struct iphdr);

	if ((void *)(tcp + 1) > ctx_data_end(ctx))
		return NULL;
	return tcp;
}

static __always_inline int lb4_reject_tcp(struct __ctx_buff *ctx, const struct lb4_packet *pkt)
{
	struct pseudo { __be32 saddr, daddr; __u8 zero, proto; __be16 len; } ph = {};
	struct ethhdr *eth;
	struct iphdr *ip;
	struct tcphdr *tcp;
	__be32 seq, ack_seq;
	__u32 payload;
	__u8 flags;
	__u64 csum;

	if (pkt->ihl != sizeof(struct iphdr) || (pkt->tcp_flags & LB_TCP_RST))
		return CTX_ACT_DROP;
	tcp = lb4_tcp_header(ctx);
	if (!tcp)
		return CTX_ACT_DROP;
	ip = (void *)tcp - sizeof(*ip);
	payload = pkt->ip_len - sizeof(*ip) - tcp->doff * 4;
	if (pkt->ip_len < sizeof(*ip) + tcp->doff * 4)
		payload = 0;
	flags = pkt->tcp_flags;
	if (flags & LB_TCP_ACK) {
		seq = tcp->ack_seq;
		ack_seq = 0;
	} else {
		seq = 0;
		ack_seq = bpf_htonl(bpf_ntohl(tcp->seq) + payload + !!(flags & LB_TCP_SYN) +
				    !!(flags & LB_TCP_FIN));
	}
	if (ctx_change_tail(ctx, sizeof(*eth) + sizeof(*ip) + sizeof(*tcp)) < 0)
		return CTX_ACT_DROP;
	tcp = lb4_tcp_header(ctx);  /* resizing invalidated every packet pointer */
	if (!tcp)
		return CTX_ACT_DROP;
	ip = (void *)tcp - sizeof(*ip);
	eth = (void *)ip - sizeof(*eth);

	lb_swap_macs(eth);
	lb4_fill_ip(ip, pkt->daddr, pkt->saddr, IPPROTO_TCP, sizeof(*ip) + sizeof(*tcp));
	tcp->source = pkt->dport;
	tcp->dest = pkt->sport;
	tcp->seq = seq;
	tcp->ack_seq = ack_seq;
	((__u8 *)tcp)[12] = 5 << 4;  /* doff 5, no reserved bits */
	((__u8 *)tcp)[13] = (flags & LB_TCP_ACK) ? LB_TCP_RST : (LB_TCP_RST | LB_TCP_ACK);
	tcp->window = 0;
	tcp->urg_ptr = 0;
	tcp->check = 0;
	ph.saddr = pkt->daddr;
	ph.daddr = pkt->saddr;
	ph.proto = IPPROTO_TCP;
	ph.len = bpf_htons(sizeof(*tcp));
	csum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	csum = bpf_csum_diff(0, 0, (__be32 *)tcp, sizeof(*tcp), csum);
	tcp->check = lb_csum_fold(csum);
	return ctx_redirect_back(ctx);
}

#define LB4_ICMP_QUOTE (sizeof(struct iphdr) + 8)  /* offending IP header + 8 bytes (RFC 792) */

static __always_inline int lb4_reject_udp(struct __ctx_buff *ctx, const struct lb4_packet *pkt)
{
	const __u32 room = sizeof(struct iphdr) + sizeof(struct icmphdr);
	void *data, *data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct icmphdr *icmp;
	__u64 csum;

	if (pkt->ihl != sizeof(struct iphdr))
		return CTX_ACT_DROP;
	/* eth | new ip | icmp | offending ip | 8 bytes of udp */
	if (ctx_grow_after_mac(ctx, room) < 0)
		return CTX_ACT_DROP;
	if (ctx_change_tail(ctx, sizeof(struct ethhdr) + room + LB4_ICMP_QUOTE) < 0)
		return CTX_ACT_DROP;
	data = ctx_data(ctx);
	data_end = ctx_data_end(ctx);
	eth = data;
	ip = (void *)(eth + 1);
	icmp = (void *)(ip + 1);
	if ((void *)icmp + sizeof(*icmp) + LB4_ICMP_QUOTE > data_end)
		return CTX_ACT_DROP;

	lb_swap_macs(eth);
	lb4_fill_ip(ip, pkt->daddr, pkt->saddr, IPPROTO_ICMP, room + LB4_ICMP_QUOTE);
	icmp->type = 3;  /* destination unreachable */
	icmp->code = 3;  /* port unreachable */
	icmp->checksum = 0;
	icmp->un.gateway = 0;
	csum = bpf_csum_diff(0, 0, (__be32 *)icmp, sizeof(*icmp) + LB4_ICMP_QUOTE, 0);
	icmp->checksum = lb_csum_fold(csum);
	return ctx_redirect_back(ctx);
}

/* Reject, by the packet's protocol. */
static __always_inline int lb4_reject(struct __ctx_buff *ctx, const struct lb4_packet *pkt)
{
	return pkt->proto == IPPROTO_TCP ? lb4_reject_tcp(ctx, pkt) : lb4_reject_udp(ctx, pkt);
}

#endif /* LBCTL_REJECT_H */

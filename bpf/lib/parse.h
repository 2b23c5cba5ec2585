/* parse.h: bounds-checked header parsing into a small tuple, on (data, data_end), so that tc
 * (ctx/skb.h) and XDP (ctx/xdp.h) programs share it.
 *
 * Every pointer is checked against data_end before use: the verifier rejects the program
 * otherwise, and a truncated packet must be passed untouched, never read past its end. */
#ifndef LBCTL_PARSE_H
#define LBCTL_PARSE_H

#define LB_PARSE_OK (-1)             /* anything >= 0 is an LB_STAT_PASS_* reason */

#define LB_TCP_FIN 0x01
#define LB_TCP_SYN 0x02
#define LB_TCP_RST 0x04
#define LB_TCP_ACK 0x10

/* Headers the parser reads: Ethernet, IPv4 with options, TCP (see ctx_pull). */
#define LB4_HEADERS_MAX (sizeof(struct ethhdr) + 60 + sizeof(struct tcphdr))

struct lb4_packet {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;              /* LB_TCP_* (0 for UDP) */
	__u16 l4_off;                /* offset of the TCP/UDP header from the start of the frame */
	__u16 ihl;                   /* IP header length in bytes */
	__u16 ip_len;                /* IP total length */
	__u8 csum_partial;           /* XDP only: the L4 checksum field holds a partial sum (see
				      * lb4_csum_partial); the skb helpers know it themselves */
	__u8 pad[3];
};

/* A SYN opening a connection (not the SYN-ACK answering one). */
static __always_inline int lb4_is_syn(const struct lb4_packet *pkt)
{
	return pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & (LB_TCP_SYN | LB_TCP_ACK)) == LB_TCP_SYN;
}

/* Reads Ethernet + IPv4 + the TCP/UDP ports. Returns LB_PARSE_OK or the reason to pass. */
static __always_inline int lb4_parse(void *data, void *data_end, struct lb4_packet *pkt)
{
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u8 *l4;

	if ((void *)(eth + 1) > data_end)
		return LB_STAT_PASS_MALFORMED;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return LB_STAT_PASS_NOT_IP;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return LB_STAT_PASS_MALFORMED;
	if (ip->version != 4 || ip->ihl < 5)
		return LB_STAT_PASS_MALFORMED;
	pkt->ihl = ip->ihl * 4;
	pkt->ip_len = bpf_ntohs(ip->tot_len);
	if (pkt->ip_len < pkt->ihl)
		return LB_STAT_PASS_MALFORMED;
	/* Later fragments carry no ports, and rewriting only the first would split a datagram
	 * between two hosts: fragments are left to the stack (see README, "Limits"). */
	if (ip->frag_off & bpf_htons(0x3fff))
		return LB_STAT_PASS_FRAGMENT;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return LB_STAT_PASS_NO_SERVICE;

	pkt->proto = ip->protocol;
	pkt->saddr = ip->saddr;
	pkt->daddr = ip->daddr;
	pkt->l4_off = sizeof(struct ethhdr) + pkt->ihl;
	/* ihl is 4 bits, so this offset is bounded (<= 60): the verifier can follow it. */
	l4 = (__u8 *)ip + pkt->ihl;
	if (pkt->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)l4;

		if ((void *)(tcp + 1) > data_end || tcp->doff < 5 ||
		    pkt->ip_len < pkt->ihl + sizeof(*tcp))
			return LB_STAT_PASS_MALFORMED;
		pkt->sport = tcp->source;
		pkt->dport = tcp->dest;
		pkt->tcp_flags = ((__u8 *)tcp)[13];
	} else {
		struct udphdr *udp = (void *)l4;

		if ((void *)(udp + 1) > data_end || pkt->ip_len < pkt->ihl + sizeof(*udp))
			return LB_STAT_PASS_MALFORMED;
		pkt->sport = udp->source;
		pkt->dport = udp->dest;
		pkt->tcp_flags = 0;
	}
	return LB_PARSE_OK;
}

#endif /* LBCTL_PARSE_H */

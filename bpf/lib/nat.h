/* lbctl_nat.h: address/port rewrites with incremental checksum updates. */
#ifndef LBCTL_NAT_H
#define LBCTL_NAT_H

#define LB_IP_SADDR_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, saddr))
#define LB_IP_DADDR_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, daddr))
#define LB_IP_CSUM_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, check))

static __always_inline int lb_l4_csum_off(const struct lb4_packet *pkt)
{
	return pkt->l4_off + (pkt->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
							: offsetof(struct udphdr, check));
}

/* Rewrites one endpoint of the packet (source for reverse NAT, destination for DNAT):
 * the address in the IP header, the port in the L4 header, and the three checksums they
 * feed (IP header, L4 including its pseudo header). The helpers update checksums
 * incrementally and cope with CHECKSUM_PARTIAL skbs from veths; BPF_F_MARK_MANGLED_0 keeps
 * a zero UDP checksum ("none") zero. */
static __always_inline int lb_nat_rewrite(struct __sk_buff *skb, const struct lb4_packet *pkt,
					  int source, __be32 new_addr, __be16 new_port)
{
	__be32 old_addr = source ? pkt->saddr : pkt->daddr;
	__be16 old_port = source ? pkt->sport : pkt->dport;
	int addr_off = source ? LB_IP_SADDR_OFF : LB_IP_DADDR_OFF;
	int port_off = pkt->l4_off + (source ? 0 : 2);
	int csum_off = lb_l4_csum_off(pkt);
	__u64 mangled = pkt->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
				mangled | BPF_F_PSEUDO_HDR | sizeof(new_addr)) < 0)
		return -1;
	if (old_port != new_port &&
	    bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | sizeof(new_port)) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, LB_IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0) < 0)
		return -1;
	if (old_port != new_port && bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0) < 0)
		return -1;
	return 0;
}

static __always_inline __u16 lb_csum_fold(__u64 csum)
{
	csum = (csum & 0xffffffff) + (csum >> 32);
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return ~csum;
}

static __always_inline void lb_swap_macs(struct ethhdr *eth)
{
	__u8 tmp[ETH_ALEN];

	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
}

static __always_inline void lb_fill_ip(struct iphdr *ip, __be32 saddr, __be32 daddr, __u8 proto,
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
	ip->check = lb_csum_fold(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));
}

/* The TCP header behind an Ethernet and a 20-byte IP header, or NULL if the packet is shorter.
 * Callers derive the IP and Ethernet headers from it: the bounds check covers them too. */
static __always_inline struct tcphdr *lb_tcp_header(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct tcphdr *tcp = data + sizeof(struct ethhdr) + sizeof(struct iphdr);

	if ((void *)(tcp + 1) > data_end)
		return NULL;
	return tcp;
}

/* kube-proxy REJECTs traffic for a service without endpoints; so do we, answering in place
 * and sending the answer back out of the interface it came in by:
 *   TCP: a RST (RFC 9293 3.10.7.1, as netfilter's nf_send_reset builds it);
 *   UDP: ICMP port unreachable quoting the offending header, from the service address.
 * Only plain 20-byte IP headers are answered; anything else is dropped. */
static __always_inline int lb_reject_tcp(struct __sk_buff *skb, const struct lb4_packet *pkt)
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
		return TC_ACT_SHOT;
	tcp = lb_tcp_header(skb);
	if (!tcp)
		return TC_ACT_SHOT;
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
	if (bpf_skb_change_tail(skb, sizeof(*eth) + sizeof(*ip) + sizeof(*tcp), 0) < 0)
		return TC_ACT_SHOT;
	tcp = lb_tcp_header(skb);  /* change_tail invalidated every packet pointer */
	if (!tcp)
		return TC_ACT_SHOT;
	ip = (void *)tcp - sizeof(*ip);
	eth = (void *)ip - sizeof(*eth);

	lb_swap_macs(eth);
	lb_fill_ip(ip, pkt->daddr, pkt->saddr, IPPROTO_TCP, sizeof(*ip) + sizeof(*tcp));
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
	return bpf_redirect(skb->ifindex, 0);
}

#define LB_ICMP_QUOTE (sizeof(struct iphdr) + 8)  /* offending IP header + 8 bytes (RFC 792) */

static __always_inline int lb_reject_udp(struct __sk_buff *skb, const struct lb4_packet *pkt)
{
	const __u32 room = sizeof(struct iphdr) + sizeof(struct icmphdr);
	void *data, *data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct icmphdr *icmp;
	__u64 csum;

	if (pkt->ihl != sizeof(struct iphdr))
		return TC_ACT_SHOT;
	/* eth | new ip | icmp | offending ip | 8 bytes of udp */
	if (bpf_skb_adjust_room(skb, room, BPF_ADJ_ROOM_MAC, 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, sizeof(struct ethhdr) + room + LB_ICMP_QUOTE, 0) < 0)
		return TC_ACT_SHOT;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	icmp = (void *)(ip + 1);
	if ((void *)icmp + sizeof(*icmp) + LB_ICMP_QUOTE > data_end)
		return TC_ACT_SHOT;

	lb_swap_macs(eth);
	lb_fill_ip(ip, pkt->daddr, pkt->saddr, IPPROTO_ICMP, room + LB_ICMP_QUOTE);
	icmp->type = 3;  /* destination unreachable */
	icmp->code = 3;  /* port unreachable */
	icmp->checksum = 0;
	icmp->un.gateway = 0;
	csum = bpf_csum_diff(0, 0, (__be32 *)icmp, sizeof(*icmp) + LB_ICMP_QUOTE, 0);
	icmp->checksum = lb_csum_fold(csum);
	return bpf_redirect(skb->ifindex, 0);
}

#endif /* LBCTL_NAT_H */

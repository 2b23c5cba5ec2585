/* csum.h: Internet checksums (RFC 1071): folding a 32-bit partial sum, and whole-header sums
 * for packets the program builds itself (RST, ICMP). Incremental updates of a rewritten field
 * are the context's (ctx_l3_csum_replace, ctx_l4_csum_replace). */
#ifndef LBCTL_CSUM_H
#define LBCTL_CSUM_H

/* For ctx_l4_csum_replace: the field holds a partial sum, not a checksum (XDP only; the skb
 * wrappers drop the bit, the kernel knowing it from the skb). Above the kernel's flag bits. */
#define LB_CSUM_F_PARTIAL (1ULL << 32)

/* The 16-bit one's complement of a 32-bit (or carried 64-bit) one's complement sum. */
static __always_inline __u16 lb_csum_fold(__u64 csum)
{
	csum = (csum & 0xffffffff) + (csum >> 32);
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return ~csum;
}

/* Checksum of an IPv4 header without options (its check field must be zero). */
static __always_inline __u16 lb4_ip_csum(struct iphdr *ip)
{
	return lb_csum_fold(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));
}

#endif /* LBCTL_CSUM_H */

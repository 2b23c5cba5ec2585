/* ctx/xdp.h: the packet context of XDP programs (struct xdp_md) behind the same names as
 * ctx/skb.h (after Cilium's bpf/include/bpf/ctx/xdp.h), so that the parser, the rewrites and
 * the rejects in lib/ serve both hooks.
 *
 * XDP has no skb helpers: writes and checksum updates are direct, on bounds-checked pointers.
 * A frame from a NIC carries full checksums. But XDP also sees frames whose L4 checksum field
 * holds only the pseudo-header sum, to be finished by whoever transmits them (CHECKSUM_PARTIAL):
 * native XDP on a veth, sent by a local socket on the other side; generic XDP on any device,
 * after GRO merged segments. No skb state says so; lb4_csum_partial (nat.h) recognises such a
 * field (it equals the pseudo-header sum) and the rewrite then updates it as the kernel's
 * helpers do for CHECKSUM_PARTIAL: addresses (in the pseudo header) change it, ports do not.
 * A full checksum equal by chance to its pseudo-header sum (about 1 in 65536 segments) is
 * taken for partial and leaves with a wrong checksum: the receiver drops it and TCP sends it
 * again (its timestamp option, and so its checksum, differs); a UDP datagram is lost. */
#ifndef LBCTL_CTX_XDP_H
#define LBCTL_CTX_XDP_H

#include "lib/csum.h"

#define __ctx_buff xdp_md

#define CTX_ACT_OK XDP_PASS
#define CTX_ACT_DROP XDP_DROP
#define CTX_DIRECT_CSUM 1               /* checksum fields written here (lb4_csum_partial) */

static __always_inline void *ctx_data(const struct xdp_md *ctx)
{
	return (void *)(long)ctx->data;
}

static __always_inline void *ctx_data_end(const struct xdp_md *ctx)
{
	return (void *)(long)ctx->data_end;
}

static __always_inline __u32 ctx_len(const struct xdp_md *ctx)
{
	return ctx->data_end - ctx->data;
}

static __always_inline void ctx_pull(struct xdp_md *ctx, __u32 len)
{
	/* the whole frame is linear (multi-buffer frames are not handled) */
}

/* Writes of 2 or 4 bytes (ports, addresses: all the library writes). The size is a constant
 * at every call site, so the verifier sees fixed-size accesses after the bounds check. */
static __always_inline int ctx_store_bytes(struct xdp_md *ctx, __u32 off, const void *from,
					   __u32 len)
{
	void *data = ctx_data(ctx);
	void *data_end = ctx_data_end(ctx);
	__u8 *to;

	if (off > 0xffff)
		return -1;
	to = data + off;
	if (len == 2) {
		if ((void *)(to + 2) > data_end)
			return -1;
		*(__u16 *)to = *(const __u16 *)from;
	} else if (len == 4) {
		if ((void *)(to + 4) > data_end)
			return -1;
		*(__u32 *)to = *(const __u32 *)from;
	} else {
		return -1;
	}
	return 0;
}

/* The one's complement sum of a 2- or 4-byte field's 16-bit words, as they lie in memory (the
 * sum does not care about byte order, as long as the checksum is read the same way). */
static __always_inline __u32 lb_csum_words(__u32 value, __u32 size)
{
	return size == 2 ? (value & 0xffff) : (value & 0xffff) + (value >> 16);
}

/* ~(~HC + ~m + m') (RFC 1624 eqn. 3) for a 2- or 4-byte field, in plain arithmetic (no helper
 * call: at most five 16-bit words, folded by lb_csum_fold). A partial checksum (a pseudo-header
 * sum) is updated without the complements: HC + ~m + m'. */
static __always_inline int lb_xdp_csum_replace(struct xdp_md *ctx, __u32 off, __u32 from, __u32 to,
					       __u32 size, int mangled_0, int partial)
{
	void *data = ctx_data(ctx);
	void *data_end = ctx_data_end(ctx);
	__u16 *csum;
	__u32 sum;

	if (off > 0xffff || (size != 2 && size != 4))
		return -1;
	csum = data + off;
	if ((void *)(csum + 1) > data_end)
		return -1;
	if (mangled_0 && *csum == 0)    /* UDP without checksum stays without */
		return 0;
	sum = lb_csum_words(~from, size) + lb_csum_words(to, size);
	if (partial) {
		*csum = ~lb_csum_fold(sum + *csum);
		return 0;
	}
	*csum = lb_csum_fold(sum + (__u16)~*csum);
	if (mangled_0 && *csum == 0)
		*csum = 0xffff;             /* 0 means "no checksum" in UDP (RFC 768) */
	return 0;
}

static __always_inline int ctx_l3_csum_replace(struct xdp_md *ctx, __u32 off, __u32 from,
					       __u32 to, __u32 size)
{
	return lb_xdp_csum_replace(ctx, off, from, to, size & 0xf, 0, 0);
}

static __always_inline int ctx_l4_csum_replace(struct xdp_md *ctx, __u32 off, __u32 from,
					       __u32 to, __u64 flags)
{
	/* Without a partial checksum an address in the pseudo header changes the checksum as any
	 * other field does; with one, only pseudo-header fields change it. */
	if ((flags & LB_CSUM_F_PARTIAL) && !(flags & BPF_F_PSEUDO_HDR))
		return 0;
	return lb_xdp_csum_replace(ctx, off, from, to, flags & 0xf, !!(flags & BPF_F_MARK_MANGLED_0),
				   !!(flags & LB_CSUM_F_PARTIAL));
}

static __always_inline int ctx_change_tail(struct xdp_md *ctx, __u32 len)
{
	return bpf_xdp_adjust_tail(ctx, (int)len - (int)ctx_len(ctx));
}

/* Inserts `len` bytes right after the Ethernet header: room at the head, then the Ethernet
 * header moved to the new start. */
static __always_inline int ctx_grow_after_mac(struct xdp_md *ctx, __u32 len)
{
	void *data, *data_end;
	struct ethhdr *old_eth, *eth, tmp;

	if (len > 64 || bpf_xdp_adjust_head(ctx, -(int)len) < 0)
		return -1;
	data = ctx_data(ctx);
	data_end = ctx_data_end(ctx);
	eth = data;
	old_eth = data + len;
	if ((void *)(old_eth + 1) > data_end)
		return -1;
	tmp = *old_eth;   /* the two may overlap when len < ETH_HLEN */
	*eth = tmp;
	return 0;
}

static __always_inline int ctx_redirect_back(struct xdp_md *ctx)
{
	return XDP_TX;
}

#endif /* LBCTL_CTX_XDP_H */

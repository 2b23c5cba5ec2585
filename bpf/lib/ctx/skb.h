/* ctx/skb.h: the packet context of tc programs (struct __sk_buff), behind the names the
 * library uses for any hook (after Cilium's bpf/include/bpf/ctx/skb.h). ctx/xdp.h gives the
 * same names for XDP; a program includes exactly one of the two, before anything in lib/.
 *
 * Writes go through the skb helpers, which unclone the buffer and keep CHECKSUM_PARTIAL and
 * CHECKSUM_COMPLETE skbs (veths, GRO) consistent; reading is direct, on (data, data_end). */
#ifndef LBCTL_CTX_SKB_H
#define LBCTL_CTX_SKB_H

#define __ctx_buff __sk_buff

#define CTX_ACT_OK TC_ACT_OK            /* on to the stack (or the wire) */
#define CTX_ACT_DROP TC_ACT_SHOT
#define CTX_DIRECT_CSUM 0               /* checksums through the skb helpers (see ctx/xdp.h) */

static __always_inline void *ctx_data(const struct __sk_buff *ctx)
{
	return (void *)(long)ctx->data;
}

static __always_inline void *ctx_data_end(const struct __sk_buff *ctx)
{
	return (void *)(long)ctx->data_end;
}

static __always_inline __u32 ctx_len(const struct __sk_buff *ctx)
{
	return ctx->len;
}

/* Makes the first `len` bytes direct-readable when the skb carries them outside its linear part
 * (GRO'ed or fragmented buffers from some drivers); a no-op for the usual linear veth packet. */
static __always_inline void ctx_pull(struct __sk_buff *ctx, __u32 len)
{
	__u32 linear = ctx->data_end - ctx->data;
	__u32 want = ctx->len < len ? ctx->len : len;

	if (linear < want)
		bpf_skb_pull_data(ctx, want);
}

static __always_inline int ctx_store_bytes(struct __sk_buff *ctx, __u32 off, const void *from,
					   __u32 len)
{
	return bpf_skb_store_bytes(ctx, off, (void *)from, len, 0);
}

/* Incremental checksum updates (RFC 1624) of the 16-bit checksum at `off` for a field changing
 * from `from` to `to`; flags as the kernel's: BPF_F_PSEUDO_HDR, BPF_F_MARK_MANGLED_0, the size. */
static __always_inline int ctx_l3_csum_replace(struct __sk_buff *ctx, __u32 off, __u32 from,
					       __u32 to, __u32 size)
{
	return bpf_l3_csum_replace(ctx, off, from, to, size);
}

static __always_inline int ctx_l4_csum_replace(struct __sk_buff *ctx, __u32 off, __u32 from,
					       __u32 to, __u64 flags)
{
	return bpf_l4_csum_replace(ctx, off, from, to, flags & 0xffffffffULL);
}

/* Resizes the packet to `len` bytes from the start of the frame. */
static __always_inline int ctx_change_tail(struct __sk_buff *ctx, __u32 len)
{
	return bpf_skb_change_tail(ctx, len, 0);
}

/* Inserts `len` bytes right after the Ethernet header. */
static __always_inline int ctx_grow_after_mac(struct __sk_buff *ctx, __u32 len)
{
	return bpf_skb_adjust_room(ctx, len, BPF_ADJ_ROOM_MAC, 0);
}

/* Sends the (rewritten) packet back out of the link it arrived by: from tc ingress of a pod's
 * link, to that pod. */
static __always_inline int ctx_redirect_back(struct __sk_buff *ctx)
{
	return bpf_redirect(ctx->ifindex, 0);
}

#endif /* LBCTL_CTX_SKB_H */

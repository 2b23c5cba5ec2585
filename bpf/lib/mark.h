/* mark.h: how a verdict's marks leave the datapath (lb4_verdict.mark, lb.h).
 *
 * tc sets skb->mark itself. XDP runs before there is an skb: the uplink's XDP program reserves
 * a struct lb_xdp_meta in front of the packet (bpf_xdp_adjust_meta), writes its magic and the
 * mark for every packet it decided, and the uplink's tc ingress program, next on the same
 * packet, only moves the mark onto the skb. A packet XDP left to tc (a reject) carries a zero
 * magic and tc runs the whole path; one XDP never saw (tc mode) carries no metadata at all. */
#ifndef LBCTL_MARK_H
#define LBCTL_MARK_H

/* tc: puts the verdict's marks on the skb (ORed: other tools' bits stay). */
static __always_inline void lb_mark_apply(struct __sk_buff *ctx, const struct lb4_verdict *v)
{
	LB_TRACE_SET(mark, v->mark);
#ifndef LB_TRACE
	if (v->mark)
		ctx->mark |= v->mark;
#endif
}

/* tc: if XDP decided this packet, applies its mark and returns 1; else 0 (tc decides). */
static __always_inline int lb_xdp_meta_apply(struct __sk_buff *ctx)
{
	void *data = (void *)(long)ctx->data;
	struct lb_xdp_meta *meta = (void *)(long)ctx->data_meta;

	if ((void *)(meta + 1) > data || meta->magic != LB_XDP_META_MAGIC)
		return 0;
	if (meta->mark)
		ctx->mark |= meta->mark;
	return 1;
}

/* XDP: room for the metadata, zeroed (no verdict yet), before anything reads the packet (the
 * helper moves data_meta and invalidates packet pointers). A frame that has exactly that room
 * already (this program run again on one buffer, as BPF_PROG_TEST_RUN's repeat does) keeps it.
 * -1 if the driver has no room. */
static __always_inline int lb_xdp_meta_reserve(struct xdp_md *ctx)
{
	struct lb_xdp_meta *meta;

	if (ctx->data - ctx->data_meta != sizeof(*meta) &&
	    bpf_xdp_adjust_meta(ctx, -(int)sizeof(*meta)) < 0)
		return -1;
	meta = (void *)(long)ctx->data_meta;
	if ((void *)(meta + 1) > (void *)(long)ctx->data)
		return -1;
	meta->magic = 0;
	meta->mark = 0;
	return 0;
}

/* XDP: this packet is decided; tc only applies `mark`. */
static __always_inline void lb_xdp_meta_write(struct xdp_md *ctx, __u32 mark)
{
	struct lb_xdp_meta *meta = (void *)(long)ctx->data_meta;

	if ((void *)(meta + 1) > (void *)(long)ctx->data)
		return;
	meta->magic = LB_XDP_META_MAGIC;
	meta->mark = mark;
	LB_TRACE_SET(mark, mark);
}

#endif /* LBCTL_MARK_H */

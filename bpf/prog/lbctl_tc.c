/* lbctl_tc.c: load balancing at tc, on the links pod traffic enters the node by (host side of
 * pod veths) and on the uplink. The decisions are lib/lb.h's; these entry points only parse
 * and dispatch.
 *
 *   pod ingress      pod -> frontend      service hit: the flow's backend, or one chosen now;
 *                                         DNAT; marks (masquerade, drop)
 *                    pod -> itself        hairpin, both ways: rewritten and sent back to the pod
 *   pod egress       backend -> client    reply of a tracked flow: source back to VIP:port
 *   uplink ingress   outside -> frontend  XDP's mark (lbctl_xdp.c), or the whole path
 *   uplink egress    backend -> outside   reply of a tracked flow, after netfilter's un-SNAT
 *   anything else                         passed untouched (TC_ACT_OK), counted in lb_global_stats
 *
 * Replies are translated at egress of the client's link, after netfilter and routing have seen
 * them as they are (backend -> client, the reverse of the client -> backend they saw first):
 * rewritten on the backend's link, before the stack, they would look to nf_conntrack like an
 * unknown VIP -> client flow (INVALID: dropped by kube-proxy's KUBE-FORWARD rule and by most
 * host firewalls) and to strict rp_filter like a VIP arriving by a pod's link.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <linux/stddef.h>

#include "lbctl_shared.h"
#include "lbctl_maps.h"
#include "lib/ctx/skb.h"
#include "lib/csum.h"
#include "lib/parse.h"
#include "lib/stats.h"
#include "lib/nat.h"
#include "lib/conntrack.h"
#include "lib/reject.h"
#include "lib/lb.h"
#include "lib/mark.h"

/* Ingress of a pod link (pod -> node): requests to services (internal traffic: a frontend's
 * internal scope); a hairpin flow's replies (to LB_HAIRPIN_ADDR, which only this program hands
 * out). Other replies pass: see lb_tc_egress. */
int lb_tc_ingress(struct __sk_buff *ctx)
{
	struct lb4_packet pkt = {};
	struct lb4_verdict v = {};
	int verdict, found, ret;

	lb_trace_start();
	ctx_pull(ctx, LB4_HEADERS_MAX);
	verdict = lb4_parse(ctx_data(ctx), ctx_data_end(ctx), &pkt);
	if (verdict != LB_PARSE_OK) {
		lb_count(verdict);
		return CTX_ACT_OK;
	}
	ret = lb4_frontend_packet(ctx, &pkt, LB_ORIGIN_POD, &v, &found);
	if (found) {
		lb_mark_apply(ctx, &v);
		return ret;
	}
	if (pkt.daddr == bpf_htonl(LB_HAIRPIN_ADDR))
		return lb4_reply_or_pass(ctx, &pkt);
	lb_count(LB_STAT_PASS_NO_SERVICE);
	return CTX_ACT_OK;
}

/* Egress of a pod link (node -> pod): replies to a client pod, from a backend on this node or
 * on another (through the uplink). Nothing addressed to a service reaches a pod, so the service
 * lookup is skipped. Odd packets are not counted twice. */
int lb_tc_egress(struct __sk_buff *ctx)
{
	struct lb4_packet pkt = {};

	lb_trace_start();
	ctx_pull(ctx, LB4_HEADERS_MAX);
	if (lb4_parse(ctx_data(ctx), ctx_data_end(ctx), &pkt) != LB_PARSE_OK)
		return CTX_ACT_OK;
	return lb4_reply_or_pass(ctx, &pkt);
}

/* Ingress of the uplink (outside, other nodes -> node): if the XDP program decided the packet
 * already (lbctl_xdp.c), only its mark is put on the skb; otherwise (tc mode, or a reject XDP
 * left to tc) the whole path: requests to any frontend, external traffic unless the source is
 * in the cluster CIDR. Replies from other nodes' backends pass: they are translated at egress
 * of the client's link (a pod's, or this one's for an outside client). */
int lb_tc_uplink_ingress(struct __sk_buff *ctx)
{
	struct lb4_packet pkt = {};
	struct lb4_verdict v = {};
	int verdict, found, ret;

	lb_trace_start();
	if (lb_xdp_meta_apply(ctx))
		return CTX_ACT_OK;
	ctx_pull(ctx, LB4_HEADERS_MAX);
	verdict = lb4_parse(ctx_data(ctx), ctx_data_end(ctx), &pkt);
	if (verdict != LB_PARSE_OK) {
		lb_count(verdict);
		return CTX_ACT_OK;
	}
	LB_TRACE_FLAG(LB_TRACE_F_UPLINK);
	ret = lb4_frontend_packet(ctx, &pkt, LB_ORIGIN_UPLINK, &v, &found);
	if (found) {
		lb_mark_apply(ctx, &v);
		return ret;
	}
	lb_count(LB_STAT_PASS_NO_SERVICE);
	return CTX_ACT_OK;
}

/* Egress of the uplink (node -> outside): replies to outside clients, from backends here or,
 * through a masquerade netfilter has undone by now, on other nodes. */
int lb_tc_uplink_egress(struct __sk_buff *ctx)
{
	struct lb4_packet pkt = {};

	lb_trace_start();
	ctx_pull(ctx, LB4_HEADERS_MAX);
	if (lb4_parse(ctx_data(ctx), ctx_data_end(ctx), &pkt) != LB_PARSE_OK)
		return CTX_ACT_OK;
	LB_TRACE_FLAG(LB_TRACE_F_UPLINK);
	return lb4_reply_or_pass(ctx, &pkt);
}

/* lbctl_xdp.c: the uplink's requests at the earliest point. For a packet from outside (or
 * another node) to a NodePort, externalIP, LoadBalancer IP or ClusterIP: the frontend lookup,
 * the source range check, the backend choice, the conntrack entries and the DNAT, exactly as the
 * tc path (lib/lb.h, on ctx/xdp.h), then XDP_PASS with the verdict's mark in the packet's
 * metadata for the uplink's tc ingress program to put on the skb (lib/mark.h).
 *
 * Passed, never redirected: the stack must see the DNATed packet, so that nf_conntrack tracks
 * client -> backend (a backend's SYN-ACK to a flow it never saw would be INVALID, and dropped
 * where INVALID is dropped), strict rp_filter checks the client's source on this link, the
 * masquerade rule sees the mark, and routing picks the backend's link or node.
 * Drops are marks too (the constant filter rule drops them), so that every mode drops in one
 * place (XDP_DROP here only while the control plane has not said the rule is there); rejects (a RST or ICMP error built in place) are left to tc, which has the skb to send
 * it back (XDP_TX on a veth needs its peer in NAPI mode). Replies are not XDP's: see
 * lb_tc_uplink_egress. */
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
#include "lib/ctx/xdp.h"
#include "lib/csum.h"
#include "lib/parse.h"
#include "lib/stats.h"
#include "lib/nat.h"
#include "lib/conntrack.h"
#include "lib/reject.h"
#include "lib/lb.h"
#include "lib/mark.h"

int lb_xdp_uplink(struct xdp_md *ctx)
{
	struct lb4_packet pkt = {};
	struct lb4_verdict v = {};
	int verdict, found, ret;

	lb_trace_start();
	if (lb_xdp_meta_reserve(ctx) < 0) {
		lb_count(LB_STAT_XDP_NO_META);
		return CTX_ACT_OK;
	}
	verdict = lb4_parse(ctx_data(ctx), ctx_data_end(ctx), &pkt);
	if (verdict != LB_PARSE_OK) {
		lb_count(verdict);
		lb_xdp_meta_write(ctx, 0);
		return CTX_ACT_OK;
	}
	LB_TRACE_FLAG(LB_TRACE_F_UPLINK);
	pkt.csum_partial = lb4_csum_partial(ctx, &pkt);
	ret = lb4_frontend_packet(ctx, &pkt, LB_ORIGIN_UPLINK | LB_ORIGIN_XDP, &v, &found);
	if (!found) {
		lb_count(LB_STAT_PASS_NO_SERVICE);
		lb_xdp_meta_write(ctx, 0);
		return CTX_ACT_OK;
	}
	if (v.defer)
		return CTX_ACT_OK;          /* metadata without magic: tc's full path */
	if (ret == CTX_ACT_OK)
		lb_xdp_meta_write(ctx, v.mark);
	return ret;
}

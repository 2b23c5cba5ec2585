/* lbctl_tc.c: ClusterIP load balancing at tc, on the links pod traffic enters the node by
 * (host side of pod veths). The decisions are lib/lb.h's; these entry points only parse and
 * dispatch.
 *
 *   ingress   pod -> VIP:port      service hit: the flow's backend, or one chosen now; DNAT
 *             pod -> itself        hairpin, both ways: rewritten and sent back to the pod
 *   egress    backend -> client    reply of a tracked flow: source back to VIP:port
 *   anything else                  passed untouched (TC_ACT_OK), counted in lb_global_stats
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

/* Ingress of a pod link (pod -> node): requests to services; a hairpin flow's replies (to
 * LB_HAIRPIN_ADDR, which only this program hands out). Other replies pass: see lb_tc_egress. */
int lb_tc_ingress(struct __sk_buff *ctx)
{
	struct lb4_packet pkt = {};
	struct lb4_service_key frontend = {};
	struct lb4_service_value *svc;
	int verdict;

	lb_trace_start();
	ctx_pull(ctx, LB4_HEADERS_MAX);
	verdict = lb4_parse(ctx_data(ctx), ctx_data_end(ctx), &pkt);
	if (verdict != LB_PARSE_OK) {
		lb_count(verdict);
		return CTX_ACT_OK;
	}
	frontend.address = pkt.daddr;
	frontend.dport = pkt.dport;
	frontend.proto = pkt.proto;
	frontend.scope = LB_SCOPE_EXTERNAL;
	svc = lb4_services.lookup(&frontend);
	if (svc) {
		/* a copy: the control plane may rewrite the frontend while this packet is handled */
		struct lb4_service_value service = *svc;

		return lb4_service_packet(ctx, &pkt, &frontend, &service);
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

/* lbctl_sock.c: socket-level load balancing of host-originated traffic, in cgroup v2 sock_addr
 * programs attached to the configured cgroup (`lbctl run --cgroup-root`). The decisions are
 * lib/sock.h's (on lib/lb.h's backend choice and affinity); these entry points only dispatch.
 *
 *   connect4      TCP connect(), UDP connect() to a frontend     destination := a backend
 *   sendmsg4      unconnected UDP sendto() to a frontend          destination := a backend
 *   recvmsg4      UDP recvfrom() from a backend of a balanced socket   source := the frontend
 *   getpeername4  getpeername() of a balanced socket                   peer := the frontend
 *   anything else                                                     untouched
 *
 * The maps are the tc programs' (pinned, shared), plus lb4_reverse_sk, which only these
 * programs use and which is pinned next to the others.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/asm-generic/errno.h>
#include <linux/stddef.h>

#include "lbctl_shared.h"
#include "lbctl_maps.h"

/* (socket cookie, backend) -> the frontend the application named; see lbctl_shared.h. */
BPF_TABLE_PINNED("lru_hash", struct lb4_reverse_sk_key, struct lb4_reverse_sk_value, lb4_reverse_sk,
		 LB_REVERSE_SK_MAP_SIZE, LB_PIN_DIR "/lb4_reverse_sk");

/* lib/lb.h is written for packet programs too: its packet helpers need a context type, and
 * are never called from here (so the verifier never sees them). */
#include "lib/ctx/skb.h"
#include "lib/csum.h"
#include "lib/parse.h"
#include "lib/stats.h"
#include "lib/nat.h"
#include "lib/conntrack.h"
#include "lib/reject.h"
#include "lib/lb.h"
#include "lib/sock.h"

int lb4_connect(struct bpf_sock_addr *ctx)
{
	return lb4_sock_forward(ctx, LB_STAT_SOCK_CONNECT);
}

int lb4_sendmsg(struct bpf_sock_addr *ctx)
{
	return lb4_sock_forward(ctx, LB_STAT_SOCK_SENDMSG);
}

/* recvmsg4 and getpeername4 may only return 1 (the kernel refuses a program that could fail
 * them): a translation that cannot be made leaves the backend's address. */
int lb4_recvmsg(struct bpf_sock_addr *ctx)
{
	lb4_sock_reverse(ctx);
	return LB_SOCK_PROCEED;
}

int lb4_getpeername(struct bpf_sock_addr *ctx)
{
	lb4_sock_reverse(ctx);
	return LB_SOCK_PROCEED;
}

/* stats.h: the datapath's counters, and what the trace build reports instead of them.
 *
 * `lbctl trace` compiles the same program with -DLB_TRACE and runs it on one crafted packet
 * (BPF_PROG_TEST_RUN) against the live pinned maps. That build writes no map of the datapath:
 * the counting below becomes notes in the packet's lb4_trace_result (the lb_trace map, which
 * only that build has), and every other map write (conntrack create/touch/delete, affinity)
 * is compiled out where it is made, under `#ifndef LB_TRACE`. */
#ifndef LBCTL_STATS_H
#define LBCTL_STATS_H

#ifdef LB_TRACE
static __always_inline struct lb4_trace_result *lb_trace_result(void)
{
	__u32 zero = 0;

	return lb_trace.lookup(&zero);
}
#define LB_TRACE_SET(field, value)                                              \
	do {                                                                    \
		struct lb4_trace_result *__t = lb_trace_result();               \
		if (__t)                                                        \
			__t->field = (value);                                   \
	} while (0)
#define LB_TRACE_FLAG(flag)                                                     \
	do {                                                                    \
		struct lb4_trace_result *__t = lb_trace_result();               \
		if (__t)                                                        \
			__t->flags |= (flag);                                   \
	} while (0)
#else
#define LB_TRACE_SET(field, value) do { } while (0)
#define LB_TRACE_FLAG(flag) do { } while (0)
#endif

/* At the start of every program run: a trace reports this packet only. */
static __always_inline void lb_trace_start(void)
{
#ifdef LB_TRACE
	struct lb4_trace_result *t = lb_trace_result();

	if (t)
		__builtin_memset(t, 0, sizeof(*t));
#endif
}

/* Counts one LB_STAT_* event (per CPU: no atomic needed). */
static __always_inline void lb_count(__u32 index)
{
#ifdef LB_TRACE
	struct lb4_trace_result *t = lb_trace_result();

	if (t && index < 32)
		t->stats |= 1U << index;
#else
	__u64 *value = lb_global_stats.lookup(&index);

	if (value)
		*value += 1;
#endif
}

static __always_inline void lb_stats_add(struct lb_stats *stats, __u32 bytes, int new_flow)
{
	if (!stats)
		return;
	stats->packets += 1;
	stats->bytes += bytes;
	stats->flows += new_flow;
}

/* A service packet's bytes, on its service and (unless 0: none) its backend. */
static __always_inline void lb_account(__u32 service_id, __u32 backend_id, __u32 bytes, int new_flow)
{
#ifndef LB_TRACE
	lb_stats_add(lb_service_stats.lookup(&service_id), bytes, new_flow);
	if (backend_id)
		lb_stats_add(lb_backend_stats.lookup(&backend_id), bytes, new_flow);
#endif
}

#endif /* LBCTL_STATS_H */

/* lbctl_maps.h: the maps, pinned under LB_PIN_DIR (default /sys/fs/bpf/lbctl).
 *
 * BPF_TABLE_PINNED reuses a map already pinned at that path, so a restarted agent (or a
 * replaced program) sees the same services and the same connection tracking: established
 * flows keep their backend across restarts. */
#ifndef LBCTL_MAPS_H
#define LBCTL_MAPS_H

#ifndef LB_PIN_DIR
#define LB_PIN_DIR "/sys/fs/bpf/lbctl"
#endif

/* Frontends (slot 0) and backend slots (1..count). */
BPF_TABLE_PINNED("hash", struct lb4_service_key, struct lb4_service_value, lb4_services,
		 LB_SERVICES_MAP_SIZE, LB_PIN_DIR "/lb4_services");

/* Backend id -> endpoint address (a hash, so that removing a backend is a delete). */
BPF_TABLE_PINNED("hash", __u32, struct lb4_backend, lb4_backends,
		 LB_BACKENDS_MAP_SIZE, LB_PIN_DIR "/lb4_backends");

/* Connection tracking, two entries per flow; LRU so a full table evicts the oldest flows
 * instead of refusing new ones. One shared LRU (not per-CPU): a flow's packets may be
 * handled on any CPU. */
BPF_TABLE_PINNED("lru_hash", struct lb4_ct_key, struct lb4_ct_value, lb4_ct,
		 LB_CT_MAP_SIZE, LB_PIN_DIR "/lb4_ct");

/* sessionAffinity: ClientIP, per (client, service). LRU: old clients fall out first. */
BPF_TABLE_PINNED("lru_hash", struct lb4_affinity_key, struct lb4_affinity_value, lb4_affinity,
		 LB_AFFINITY_MAP_SIZE, LB_PIN_DIR "/lb4_affinity");

/* Counters: per service id, per backend id, and datapath-wide (LB_STAT_*). */
BPF_TABLE_PINNED("percpu_array", __u32, struct lb_stats, lb_service_stats,
		 LB_SERVICE_IDS, LB_PIN_DIR "/lb_service_stats");
BPF_TABLE_PINNED("percpu_array", __u32, struct lb_stats, lb_backend_stats,
		 LB_BACKENDS_MAP_SIZE, LB_PIN_DIR "/lb_backend_stats");
BPF_TABLE_PINNED("percpu_array", __u32, __u64, lb_global_stats,
		 LB_STAT_MAX, LB_PIN_DIR "/lb_global_stats");

/* loadBalancerSourceRanges, per service (see struct lb4_source_range_key). */
BPF_TABLE_PINNED("lpm_trie", struct lb4_source_range_key, __u8, lb4_source_ranges,
		 LB_SOURCE_RANGES_MAP_SIZE, LB_PIN_DIR "/lb4_source_ranges", BPF_F_NO_PREALLOC);

/* The datapath's settings (struct lb4_config), index 0. */
BPF_TABLE_PINNED("array", __u32, struct lb4_config, lb4_config, 1, LB_PIN_DIR "/lb4_config");

#ifdef LB_TRACE
/* `lbctl trace` only (never pinned): what the traced packet made the program decide. */
BPF_ARRAY(lb_trace, struct lb4_trace_result, 1);
#endif

#endif /* LBCTL_MAPS_H */

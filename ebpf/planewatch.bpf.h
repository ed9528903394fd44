/* Map layouts shared by the BPF programs; ebpf/maps.py decodes the same bytes.
 * Keep every struct free of implicit padding (explicit pad fields) so the
 * Python `struct` formats stay a plain transcription. */
#ifndef PLANEWATCH_BPF_H
#define PLANEWATCH_BPF_H

#define TCX_NEXT -1            /* also TC_ACT_UNSPEC: let the next program run */

#define DIRECTION_INGRESS 0
#define DIRECTION_EGRESS 1

/* (netns inode, ifindex): ifindex is only unique inside one netns. */
struct interface_key {
	__u32 netns;
	__u32 ifindex;
};

struct traffic_key {           /* "=III" */
	__u32 netns;
	__u32 ifindex;
	__u32 direction;
};

struct traffic_value {         /* "=QQ" per CPU */
	__u64 packets;
	__u64 bytes;
};

/* Per-interface counters without a hash lookup (interface_traffic.bpf.c):
 * the loader gives each interface it attaches to a slot of `traffic_slots`
 * and writes (netns, ifindex) -> slot into one of the TRAFFIC_WAYS ways of
 * its bucket in `traffic_index`; the program finds the bucket with
 * traffic_bucket_of(), compares at most four ways and counts in the slot.
 * ebpf/traffic_slots.py computes the same bucket. */
#define TRAFFIC_BUCKET_BITS 10
#define TRAFFIC_BUCKETS (1 << TRAFFIC_BUCKET_BITS)
#define TRAFFIC_WAYS 4

struct traffic_way {           /* "=IIII" */
	__u32 netns;           /* 0: a free way (no netns has inode 0) */
	__u32 ifindex;
	__u32 slot;            /* slot + 1; 0: none (a freed way, or one being written) */
	__u32 pad;
};

struct traffic_bucket {        /* TRAFFIC_WAYS ways: one cache line */
	struct traffic_way way[TRAFFIC_WAYS];
};

struct traffic_slot {          /* "=QQQQ" per CPU: [DIRECTION_INGRESS], [DIRECTION_EGRESS] */
	struct traffic_value direction[2];
};

static __always_inline __u32 traffic_bucket_of(__u32 netns, __u32 ifindex)
{
	return ((netns ^ (ifindex * 0x85EBCA6Bu)) * 0x9E3779B1u) >> (32 - TRAFFIC_BUCKET_BITS);
}

struct drop_key {              /* "=III" */
	__u32 netns;
	__u32 ifindex;
	__u32 reason;
};

struct asym_key {              /* "=III" */
	__u32 netns;
	__u32 ingress_ifindex;
	__u32 egress_ifindex;
};

struct flow_key {              /* "=IBBH2s2s16s16s", 44 bytes */
	__u32 netns;
	__u8 family;           /* 4 or 6 */
	__u8 proto;
	__u16 pad;
	__be16 sport;          /* ICMP echo: the identifier, on both ports */
	__be16 dport;
	__u8 saddr[16];        /* IPv4 in the first 4 bytes */
	__u8 daddr[16];
};

/* Keyed by the tuple as it leaves the pod (see track_ingress). */
struct flow_value {            /* "=IIIIQQ", 32 bytes */
	__u32 ingress_ifindex;     /* last interface the reversed tuple came in by */
	__u32 egress_ifindex;      /* last interface this tuple left by */
	__u32 request_ifindex;     /* ingress_ifindex when a packet left by another one */
	__u32 owner_ifindex;       /* the interface whose packet created the entry */
	__u64 last_seen_ns;        /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	__u64 asymmetric_packets;
};

/* One slot of the per-CPU "last flow" cache (interface_traffic.bpf.c): the
 * flow key, interface and direction of a packet whose flow-table lookup found
 * nothing to do, and the flows table's generation it was found at. Never
 * read by the collector. */
struct flow_cache_slot {
	struct flow_key key;       /* 44 */
	__u32 ifindex;             /* 0: empty slot (no device has ifindex 0) */
	__u64 generation;
	__u64 pad;                 /* 64 bytes: one cache line a slot */
};

/* Index in each object's `map_refused` per-CPU array: updates a full map
 * refused (LRU maps never refuse, they evict). */
enum refused_map {
	REFUSED_IFACE_TRAFFIC = 0,
	REFUSED_ASYM_PACKETS = 1,
	REFUSED_PACKET_DROPS = 2,
	REFUSED_FLOWS_CREATED = 3,
	REFUSED_MAPS = 4,
};

#endif

// SPDX-License-Identifier: GPL-2.0
/* Per-interface packets/bytes and a flow table that spots asymmetric routing.
 *
 * Attached with TCX (or clsact) on ingress and egress of every pod interface
 * the collector watches, so everything it sees is wanted: no filter map here.
 * Keys carry the netns inode because ifindex is only unique inside one netns.
 *
 * Maps (named after what they count):
 *   traffic_index  [bucket] -> up to 4 ways (netns, ifindex) -> slot, written
 *                  by the loader when it attaches (ebpf/traffic_slots.py)
 *   traffic_slots  per-CPU [slot] -> packets, bytes by direction of the
 *                  interface the loader gave that slot
 *   iface_traffic  per-CPU (netns, ifindex, direction) -> packets, bytes of
 *                  the interfaces without a slot (their bucket or the slots
 *                  were full when they were attached)
 *   flows          LRU (netns, 5-tuple as it leaves) -> last egress ifindex and
 *                  last ingress ifindex of the reversed tuple
 *   asym_packets   per-CPU (netns, request ifindex, reply ifindex) -> packets
 *                  whose reversed tuple last came in by another interface
 *   flows_created  per-CPU (netns, ifindex) -> flows that interface created
 *   map_refused    per-CPU [map] -> updates a full map refused
 *   flow_cache     per-CPU slots: the last flows whose lookup found nothing to do
 *   flows_generation  [0] -> bumped after every write to `flows` that can change
 *                  what a lookup decides (an insert, which may evict; a changed
 *                  ingress or egress interface)
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "planewatch.bpf.h"
#include "flow_cache.bpf.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IP_OFFSET_MASK 0x1fff
#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129
#define MAX_L2_HEADER 64
#define PROTO_ICMPV6 58      /* IPPROTO_ICMPV6 is a uapi #define, not in vmlinux.h */

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TRAFFIC_BUCKETS);
	__type(key, __u32);
	__type(value, struct traffic_bucket);
} traffic_index SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2048);     /* the loader may resize before load */
	__type(key, __u32);
	__type(value, struct traffic_slot);
} traffic_slots SEC(".maps");

/* 2048 slots + 4096 keys here (2048 interfaces): 4096 interfaces as the hash
 * alone held before, in the same 128 KiB per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct traffic_key);
	__type(value, struct traffic_value);
} iface_traffic SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);    /* the loader may resize before load */
	__type(key, struct flow_key);
	__type(value, struct flow_value);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct asym_key);
	__type(value, __u64);
} asym_packets SEC(".maps");

/* Flows each interface created in the shared LRU `flows`. The LRU evicts the
 * oldest entries whoever owns them, so one pod opening many flows pushes the
 * others' out; the collector counts what each interface still holds
 * (flow_value.owner_ifindex) and reports created - held as its evicted flows. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct interface_key);
	__type(value, __u64);
} flows_created SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, REFUSED_MAPS);
	__type(key, __u32);
	__type(value, __u64);
} map_refused SEC(".maps");

/* A full map refused an update: count it, per map, for /metrics. */
static __always_inline void count_refused(__u32 map)
{
	__u64 *value = bpf_map_lookup_elem(&map_refused, &map);

	if (value)
		(*value)++;
}

/* The netns of the device the program runs on; not bpf_get_netns_cookie(),
 * which is the sending socket's netns. */
static __always_inline __u32 device_netns(struct sk_buff *kskb)
{
	return kskb->dev->nd_net.net->ns.inum;
}

/* The interface's counters in its slot: two array lookups the verifier
 * inlines (no call, no key hashing: ~25 ns less than the hash lookup), or
 * NULL when the loader gave it no slot. */
static __always_inline struct traffic_value *slot_counters(__u32 netns, __u32 ifindex, __u32 direction)
{
	__u32 index = traffic_bucket_of(netns, ifindex);
	struct traffic_bucket *bucket = bpf_map_lookup_elem(&traffic_index, &index);
	struct traffic_slot *slot;

	if (!bucket)
		return NULL;
#pragma unroll
	for (int i = 0; i < TRAFFIC_WAYS; i++) {
		if (bucket->way[i].netns != netns || bucket->way[i].ifindex != ifindex)
			continue;
		index = bucket->way[i].slot;
		if (!index)
			return NULL;     /* released, or caught half-written: the hash counts it */
		index--;
		slot = bpf_map_lookup_elem(&traffic_slots, &index);
		return slot ? &slot->direction[direction] : NULL;
	}
	return NULL;
}

static __always_inline void count_traffic(__u32 netns, __u32 ifindex, __u32 direction, __u32 len)
{
	struct traffic_key key = { .netns = netns, .ifindex = ifindex, .direction = direction };
	struct traffic_value *value = slot_counters(netns, ifindex, direction);

	if (!value)
		value = bpf_map_lookup_elem(&iface_traffic, &key);
	if (!value) {
		struct traffic_value first = { .packets = 1, .bytes = len };

		if (bpf_map_update_elem(&iface_traffic, &key, &first, BPF_NOEXIST) == 0)
			return;
		/* another CPU created it meanwhile: count into that one */
		value = bpf_map_lookup_elem(&iface_traffic, &key);
		if (!value) {
			count_refused(REFUSED_IFACE_TRAFFIC);
			return;
		}
	}
	value->packets++;         /* per-CPU slot: no atomics needed */
	value->bytes += len;
}

static __always_inline void count_flow_created(__u32 netns, __u32 ifindex)
{
	struct interface_key key = { .netns = netns, .ifindex = ifindex };
	__u64 one = 1, *value = bpf_map_lookup_elem(&flows_created, &key);

	if (value) {
		(*value)++;
		return;
	}
	if (bpf_map_update_elem(&flows_created, &key, &one, BPF_NOEXIST) == 0)
		return;
	value = bpf_map_lookup_elem(&flows_created, &key);
	if (value)
		(*value)++;
	else
		count_refused(REFUSED_FLOWS_CREATED);
}

static __always_inline void count_asymmetric(__u32 netns, __u32 ingress, __u32 egress)
{
	struct asym_key key = { .netns = netns, .ingress_ifindex = ingress, .egress_ifindex = egress };
	__u64 one = 1, *value = bpf_map_lookup_elem(&asym_packets, &key);

	if (value) {
		(*value)++;
		return;
	}
	if (bpf_map_update_elem(&asym_packets, &key, &one, BPF_NOEXIST) == 0)
		return;
	value = bpf_map_lookup_elem(&asym_packets, &key);
	if (value)
		(*value)++;
	else
		count_refused(REFUSED_ASYM_PACKETS);
}

/* Offset of the IP header from skb->data: 14 on Ethernet devices, 0 on L3
 * devices; the kernel's own header offsets say which, on ingress and egress. */
static __always_inline __u32 network_offset(struct sk_buff *kskb)
{
	__u16 mac = kskb->mac_header, net = kskb->network_header;

	if (mac == (__u16)~0U || net < mac)
		return 0;
	return net - mac;
}

/* Copy `len` bytes at `off` from skb->data: straight from the linear part when
 * they are there (no helper call: ~40 ns less per packet on the flow path),
 * else through bpf_skb_load_bytes (paged or short linear data). */
static __always_inline int load_header(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;

	if (off <= 2 * MAX_L2_HEADER + 60 && data + off + len <= end) {
		__builtin_memcpy(to, data + off, len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

static __always_inline void load_ports(struct __sk_buff *skb, __u32 l4, struct flow_key *key)
{
	__u8 icmp[8];

	switch (key->proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		load_header(skb, l4, &key->sport, 4);   /* sport, dport adjacent */
		break;
	case IPPROTO_ICMP:
	case PROTO_ICMPV6:
		if (load_header(skb, l4, icmp, sizeof(icmp)))
			break;
		/* echo request and reply share the identifier: use it as both
		 * ports so the reversed tuple of a reply is its request */
		if (icmp[0] == ICMP_ECHO || icmp[0] == ICMP_ECHOREPLY ||
		    icmp[0] == ICMPV6_ECHO_REQUEST || icmp[0] == ICMPV6_ECHO_REPLY) {
			__builtin_memcpy(&key->sport, &icmp[4], 2);
			key->dport = key->sport;
		}
		break;
	}
}

/* Fill `key` with the packet's 5-tuple; non-zero when it is not IP. IPv6
 * extension headers are not walked (the next header is taken as the L4). */
static __always_inline int parse_flow(struct __sk_buff *skb, struct sk_buff *kskb,
				      __u32 netns, struct flow_key *key)
{
	__u32 l3 = network_offset(kskb), l4;

	if (l3 > MAX_L2_HEADER)
		return -1;
	key->netns = netns;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (load_header(skb, l3, &ip, sizeof(ip)))
			return -1;
		key->family = 4;
		key->proto = ip.protocol;
		__builtin_memcpy(key->saddr, &ip.saddr, 4);
		__builtin_memcpy(key->daddr, &ip.daddr, 4);
		if (ip.frag_off & bpf_htons(IP_OFFSET_MASK))
			return 0;          /* later fragments carry no ports */
		l4 = l3 + ip.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (load_header(skb, l3, &ip6, sizeof(ip6)))
			return -1;
		key->family = 6;
		key->proto = ip6.nexthdr;
		__builtin_memcpy(key->saddr, &ip6.saddr, 16);
		__builtin_memcpy(key->daddr, &ip6.daddr, 16);
		l4 = l3 + sizeof(ip6);
	} else {
		return -1;
	}
	load_ports(skb, l4, key);
	return 0;
}

static __always_inline void reverse_flow(const struct flow_key *key, struct flow_key *rev)
{
	rev->netns = key->netns;
	rev->family = key->family;
	rev->proto = key->proto;
	rev->pad = 0;
	rev->sport = key->dport;
	rev->dport = key->sport;
	__builtin_memcpy(rev->saddr, key->daddr, 16);
	__builtin_memcpy(rev->daddr, key->saddr, 16);
}

/* One entry per flow and netns, keyed by the tuple as it *leaves* the pod: an
 * incoming packet records its interface in the entry of its reversed tuple
 * (ingress_ifindex), an outgoing one finds there, in the same lookup as its own
 * entry, where its request came in. One lookup per packet either way (none on
 * a flow_cache hit), and the steady state writes nothing: an entry is only
 * written when its interfaces change or a packet is asymmetric, so established
 * flows dirty no cache line shared between CPUs. last_seen_ns is only shown
 * for asymmetric flows (/debug/asymmetric), so only they pay for the clock
 * read. Each returns 1 when the lookup found nothing to do (a cacheable
 * outcome), 0 when it wrote or created. */

static __always_inline int track_ingress(const struct flow_key *rev, __u32 ifindex)
{
	struct flow_value *value = bpf_map_lookup_elem(&flows, rev);

	if (value) {
		if (value->ingress_ifindex == ifindex)
			return 1;
		value->ingress_ifindex = ifindex;
		flows_written();
		return 0;
	}
	struct flow_value first = { .ingress_ifindex = ifindex, .owner_ifindex = ifindex,
				    .last_seen_ns = bpf_ktime_get_ns() };
	if (bpf_map_update_elem(&flows, rev, &first, BPF_NOEXIST) == 0) {
		flows_written();
		count_flow_created(rev->netns, ifindex);
	}
	return 0;
}

/* A packet leaving by `ifindex` whose reversed tuple last came in by another
 * interface is a reply (or the next request) taking another path back. */
static __always_inline int track_egress(const struct flow_key *key, __u32 ifindex)
{
	struct flow_value *value = bpf_map_lookup_elem(&flows, key);
	__u32 request_ifindex;
	int quiet = 1;

	if (!value) {
		struct flow_value first = { .egress_ifindex = ifindex, .owner_ifindex = ifindex,
					    .last_seen_ns = bpf_ktime_get_ns() };
		if (bpf_map_update_elem(&flows, key, &first, BPF_NOEXIST) == 0) {
			flows_written();
			count_flow_created(key->netns, ifindex);
		}
		return 0;
	}
	if (value->egress_ifindex != ifindex) {
		value->egress_ifindex = ifindex;
		flows_written();
		quiet = 0;
	}
	request_ifindex = value->ingress_ifindex;
	if (!request_ifindex || request_ifindex == ifindex)
		return quiet;
	if (value->request_ifindex != request_ifindex)
		value->request_ifindex = request_ifindex;
	value->last_seen_ns = bpf_ktime_get_ns();
	__sync_fetch_and_add(&value->asymmetric_packets, 1);
	count_asymmetric(key->netns, request_ifindex, ifindex);
	return 0;
}

/* The flow-table work for one packet: skipped when this CPU's slot says the
 * same lookup found nothing to do and no write happened since. Ingress works
 * on the reversed tuple (the entry is keyed as the flow leaves), but its
 * slots hold the tuple as it came in: one to one with the reversed one, and a
 * hit then needs no reversal (reverse_flow writes every byte of `rev`). */
static __always_inline void track(const struct flow_key *key, __u32 ifindex, __u32 direction, bool cached)
{
	struct flow_cache_slot *slot = NULL;
	struct flow_key rev;
	const struct flow_key *entry = key;
	__u64 *gen = NULL, seen = 0;

	if (cached) {
		slot = cache_slot(key, direction);
		gen = generation();
		if (!slot || !gen)
			cached = false;
	}
	if (cached) {
		seen = *(volatile __u64 *)gen;
		if (slot->ifindex == ifindex && slot->generation == seen && same_key(&slot->key, key))
			return;
		/* Filling: the lookup below must not see the table as it was
		 * before a write whose generation `seen` already is. x86 keeps
		 * loads in order (and the writer bumps after writing), so the read
		 * above does; elsewhere a fully ordered read, paid on misses only. */
#ifndef __TARGET_ARCH_x86
		seen = __sync_fetch_and_add(gen, 0);
#endif
	}
	if (direction == DIRECTION_INGRESS) {
		reverse_flow(key, &rev);
		entry = &rev;
	}
	if (!(direction == DIRECTION_INGRESS ? track_ingress(entry, ifindex) : track_egress(entry, ifindex)))
		return;
	if (cached) {
		__builtin_memcpy(&slot->key, key, sizeof(slot->key));
		slot->ifindex = ifindex;
		slot->generation = seen;
	}
}

static __always_inline int handle(struct __sk_buff *skb, __u32 direction, bool with_flows, bool cached)
{
	struct sk_buff *kskb = bpf_cast_to_kern_ctx(skb);
	__u32 netns = device_netns(kskb);
	struct flow_key key = {};

	count_traffic(netns, skb->ifindex, direction, skb->len);
	if (!with_flows || parse_flow(skb, kskb, netns, &key))
		return TCX_NEXT;
	track(&key, skb->ifindex, direction, cached);
	return TCX_NEXT;
}

SEC("tc")
int tcx_ingress(struct __sk_buff *skb)
{
	return handle(skb, DIRECTION_INGRESS, true, true);
}

SEC("tc")
int tcx_egress(struct __sk_buff *skb)
{
	return handle(skb, DIRECTION_EGRESS, true, true);
}

/* Variants for bench/ebpf_prog_test_run.py only; "?" = not loaded unless asked. */
SEC("?tc")
int bench_noop(struct __sk_buff *skb)
{
	return TCX_NEXT;
}

SEC("?tc")
int bench_counters(struct __sk_buff *skb)
{
	return handle(skb, DIRECTION_INGRESS, false, false);
}

char LICENSE[] SEC("license") = "GPL";

SEC("?tc")
int bench_parse(struct __sk_buff *skb)
{
	struct sk_buff *kskb = bpf_cast_to_kern_ctx(skb);
	__u32 netns = device_netns(kskb);
	struct flow_key key = {};

	count_traffic(netns, skb->ifindex, DIRECTION_INGRESS, skb->len);
	if (parse_flow(skb, kskb, netns, &key))
		return TCX_NEXT;
	return key.sport == 7 ? 1 : TCX_NEXT;
}

SEC("?tc")
int bench_lookup(struct __sk_buff *skb)
{
	struct sk_buff *kskb = bpf_cast_to_kern_ctx(skb);
	__u32 netns = device_netns(kskb);
	struct flow_key key = {};

	count_traffic(netns, skb->ifindex, DIRECTION_INGRESS, skb->len);
	if (parse_flow(skb, kskb, netns, &key))
		return TCX_NEXT;
	return bpf_map_lookup_elem(&flows, &key) ? TCX_NEXT : TCX_NEXT;
}

/* The flow path without flow_cache: every packet does its LRU lookup (what a
 * cache miss costs, and what tcx_* cost before the cache). */
SEC("?tc")
int bench_uncached_ingress(struct __sk_buff *skb)
{
	return handle(skb, DIRECTION_INGRESS, true, false);
}

SEC("?tc")
int bench_uncached_egress(struct __sk_buff *skb)
{
	return handle(skb, DIRECTION_EGRESS, true, false);
}

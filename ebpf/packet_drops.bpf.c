// SPDX-License-Identifier: GPL-2.0
/* Dropped packets per (netns inode, ifindex, skb_drop_reason).
 *
 * tp_btf/kfree_skb needs no tracefs and gets the reason as a typed argument.
 * It fires for every drop on the host, so only devices in `watched` (filled
 * by the loader with the pod interfaces it attached to) are counted. The
 * interface is skb->dev at drop time: the receiving device on the receive
 * path, the sending one on the transmit path.
 *
 * Maps: packet_drops  per-CPU (netns, ifindex, reason) -> packets
 *       watched       (netns, ifindex) -> 1
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "planewatch.bpf.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct drop_key);
	__type(value, __u64);
} packet_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct interface_key);
	__type(value, __u8);
} watched SEC(".maps");

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

SEC("tp_btf/kfree_skb")
int BPF_PROG(count_drop, struct sk_buff *skb, void *location, enum skb_drop_reason reason)
{
	struct net_device *dev;
	struct interface_key where;
	struct drop_key key;
	__u64 one = 1, *value;

	/* Frees that are not drops (kernels that still trace them here): the
	 * collector leaves them out anyway, so no lookup for them. Resolved at
	 * load time; a kernel without the name skips that test. */
	if (bpf_core_enum_value_exists(enum skb_drop_reason, SKB_CONSUMED) &&
	    reason == bpf_core_enum_value(enum skb_drop_reason, SKB_CONSUMED))
		return 0;
	if (bpf_core_enum_value_exists(enum skb_drop_reason, SKB_NOT_DROPPED_YET) &&
	    reason == bpf_core_enum_value(enum skb_drop_reason, SKB_NOT_DROPPED_YET))
		return 0;
	/* tp_btf arguments are typed kernel pointers: plain loads, not the
	 * bpf_probe_read_kernel calls BPF_CORE_READ makes (four per drop). */
	dev = skb->dev;
	if (!dev)
		return 0;
	where.netns = dev->nd_net.net->ns.inum;
	where.ifindex = dev->ifindex;
	if (!bpf_map_lookup_elem(&watched, &where))
		return 0;

	key.netns = where.netns;
	key.ifindex = where.ifindex;
	key.reason = reason;
	value = bpf_map_lookup_elem(&packet_drops, &key);
	if (value) {
		(*value)++;
		return 0;
	}
	if (bpf_map_update_elem(&packet_drops, &key, &one, BPF_NOEXIST) == 0)
		return 0;
	value = bpf_map_lookup_elem(&packet_drops, &key);
	if (value)
		(*value)++;
	else
		count_refused(REFUSED_PACKET_DROPS);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";

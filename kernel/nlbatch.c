/* Netlink round trips of many network namespaces in one call (kernel/nlbatch.py):
 * the RTM_GETSTATS dump of each, decoded into rows (pw_stats64_dumps), and
 * gets whose answers come back as received (pw_requests: the neighbour gets).
 *
 * A scrape asks every pod netns for its links' counters and its gateways'
 * neighbour entries, on netlink sockets kept open there (kernel/rtnl.py). In
 * Python each round trip costs about three times its two syscalls (packing,
 * copying the datagram out, the message walk, one tuple per link), all under
 * the GIL. Here a whole batch is one ctypes call, which releases the GIL.
 *
 * Only the framing the kernel defines is trusted, and no more than it: every
 * length is checked against the datagram and the attribute it sits in, as
 * kernel/rtnl.py's attrs() does. Built by kernel/Makefile; without it the
 * Python path runs (same results, tests/test_nlbatch.py compares both).
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

/* uapi values (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h), spelled
 * out so the build needs no kernel headers */
#define NLMSG_ERROR 2
#define NLMSG_DONE 3
#define NLM_F_REQUEST 0x1
#define NLM_F_DUMP 0x300
#define RTM_NEWSTATS 92
#define RTM_GETSTATS 94
#define IFLA_STATS_LINK_64 1
#define NLA_TYPE_MASK 0x3fff
#define DUMP_TRIES 3

struct nl_header {
	uint32_t len;
	uint16_t type;
	uint16_t flags;
	uint32_t seq;
	uint32_t pid;
};

struct stats_request {
	struct nl_header header;
	uint8_t family, pad1;
	uint16_t pad2;
	uint32_t ifindex;
	uint32_t filter_mask;
};

/* One link: its ifindex and the first 8 counters of rtnl_link_stats64 (rx/tx
 * packets, bytes, errors, dropped), zeros when the kernel sent none. */
struct pw_stats_row {
	uint32_t ifindex;
	uint32_t pad;
	uint64_t counters[8];
};

#define ALIGN4(n) (((n) + 3u) & ~3u)

/* The stats64 attribute of one RTM_NEWSTATS payload into `row`. */
static void decode_stats(const uint8_t *msg, uint32_t len, struct pw_stats_row *row)
{
	uint32_t off = 12;              /* struct if_stats_msg */

	memset(row, 0, sizeof(*row));
	if (len < 12)
		return;
	memcpy(&row->ifindex, msg + 4, 4);
	while (off + 4 <= len) {
		uint16_t alen, atype;

		memcpy(&alen, msg + off, 2);
		memcpy(&atype, msg + off + 2, 2);
		if (alen < 4 || off + alen > len)
			return;
		if ((atype & NLA_TYPE_MASK) == IFLA_STATS_LINK_64 && (size_t)alen - 4 >= sizeof(row->counters)) {
			memcpy(row->counters, msg + off + 4, sizeof(row->counters));
			return;
		}
		off += ALIGN4(alen);
	}
}

/* One dump on `fd`: its rows into rows[0 .. cap); the number of links, or
 * -errno. More links than `cap`: the dump is still read to its end (the
 * socket stays usable) and the count returned is past `cap`. */
static int64_t dump_stats(int fd, uint32_t seq, struct pw_stats_row *rows, int64_t cap,
			  uint8_t *buf, size_t buflen)
{
	struct stats_request req = {
		.header = { .len = sizeof(req), .type = RTM_GETSTATS,
			    .flags = NLM_F_REQUEST | NLM_F_DUMP, .seq = seq },
		.filter_mask = 1u << (IFLA_STATS_LINK_64 - 1),
	};
	int64_t count = 0;

	if (send(fd, &req, sizeof(req), 0) != (ssize_t)sizeof(req))
		return errno ? -errno : -EIO;
	for (;;) {
		ssize_t got = recv(fd, buf, buflen, 0);
		size_t off = 0;

		if (got < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (got == 0)
			return -EIO;
		while (off + sizeof(struct nl_header) <= (size_t)got) {
			struct nl_header h;

			memcpy(&h, buf + off, sizeof(h));
			if (h.len < sizeof(h) || h.len > (size_t)got - off)
				return -EBADMSG;
			if (h.seq == seq) {
				if (h.type == NLMSG_DONE)
					return count;
				if (h.type == NLMSG_ERROR) {
					int32_t code = 0;

					if (h.len >= sizeof(h) + 4)
						memcpy(&code, buf + off + sizeof(h), 4);
					return code ? code : count;     /* negative errno, or an ack */
				}
				if (h.type == RTM_NEWSTATS) {
					if (count < cap)
						decode_stats(buf + off + sizeof(h), h.len - sizeof(h), &rows[count]);
					count++;
				}
			}
			off += ALIGN4(h.len);
		}
	}
}

/* For each of the `n` sockets fds[i] (netlink, NETLINK_ROUTE, blocking), one
 * RTM_GETSTATS dump with sequence number seqs[i]; its rows go to
 * rows[first[i] .. first[i] + cap[i]) and result[i] is the number of links
 * (past cap[i] when there were more: those rows are not written), or -errno.
 * A dump the kernel interrupted (EINTR: a link changed) is started over, at
 * most DUMP_TRIES times, as RtnlSocket._dump does. `buf` (buflen bytes) is
 * the receive buffer. Returns the number of sockets that answered. */
int pw_stats64_dumps(int n, const int *fds, const uint32_t *seqs, struct pw_stats_row *rows,
		     const int64_t *first, const int64_t *cap, int64_t *result, uint8_t *buf, size_t buflen)
{
	int ok = 0;

	for (int i = 0; i < n; i++) {
		int64_t got = -EINTR;

		for (int try = 0; try < DUMP_TRIES && got == -EINTR; try++)
			got = dump_stats(fds[i], seqs[i] + try, rows + first[i], cap[i], buf, buflen);
		result[i] = got;
		ok += got >= 0;
	}
	return ok;
}

/* Several non-dump requests in one datagram on each socket, and their answers.
 *
 * For each of the `n` sockets fds[i]: send requests[offsets[i] .. offsets[i+1])
 * (one datagram of expect[i] requests numbered first_seq[i] onwards), then read
 * until each has its answer (a reply or an NLMSG_ERROR: the kernel answers a
 * get with exactly one), and append the datagrams, each padded to 4 bytes, to
 * out (cap bytes). spans[2i], spans[2i+1]: where socket i's datagrams start and
 * end in out. result[i]: 0, -errno, or -ENOSPC when out had no room left
 * (the answers are still read, so the socket stays usable). Returns the number
 * of sockets whose answers are all in out. */
int pw_requests(int n, const int *fds, const uint8_t *requests, const uint64_t *offsets,
		const uint32_t *first_seq, const uint32_t *expect, uint8_t *out, size_t cap,
		uint64_t *spans, int64_t *result, uint8_t *buf, size_t buflen)
{
	size_t used = 0;
	int ok = 0;

	for (int i = 0; i < n; i++) {
		size_t len = offsets[i + 1] - offsets[i];
		uint32_t answered = 0;
		int64_t status = 0;
		int full = 0;

		spans[2 * i] = used;
		if (expect[i] && send(fds[i], requests + offsets[i], len, 0) != (ssize_t)len)
			status = errno ? -errno : -EIO;
		while (!status && answered < expect[i]) {
			ssize_t got = recv(fds[i], buf, buflen, 0);
			size_t off = 0, padded;

			if (got < 0 && errno == EINTR)
				continue;
			if (got <= 0) {
				status = got < 0 ? -errno : -EIO;
				break;
			}
			while (off + sizeof(struct nl_header) <= (size_t)got) {
				struct nl_header h;

				memcpy(&h, buf + off, sizeof(h));
				if (h.len < sizeof(h) || h.len > (size_t)got - off) {
					status = -EBADMSG;
					break;
				}
				if (h.seq - first_seq[i] < expect[i])       /* unsigned: wraps */
					answered++;
				off += ALIGN4(h.len);
			}
			padded = ALIGN4((size_t)got);
			if (full || used + padded > cap) {
				full = 1;       /* still read to the last answer: the socket stays usable */
				continue;
			}
			memcpy(out + used, buf, got);
			memset(out + used + got, 0, padded - got);
			used += padded;
		}
		spans[2 * i + 1] = used;
		result[i] = status ? status : full ? -ENOSPC : 0;
		ok += !status && !full;
	}
	return ok;
}

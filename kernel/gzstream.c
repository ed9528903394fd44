/* One gzip member deflated while its pieces are still being made
 * (kernel/gzstream.py, exporters/http.py).
 *
 * Prometheus asks for gzip. A scrape's body (~3.4 MB at 1 000 pod interfaces)
 * took ~8 ms to deflate after the collection, a quarter of the scrape. The
 * collection renders it source by source, so the deflating can run beside it;
 * a Python thread cannot do that well: each time it comes back from zlib it
 * waits for the GIL, up to the interpreter's switch interval (5 ms), while the
 * scrape thread runs Python (measured: a batch fed at 15 ms was picked up at
 * 20 ms). Here the deflating thread waits for pieces and deflates them without
 * ever needing the GIL: Python calls pw_gz_run once on a thread of its own
 * (ctypes releases the GIL for the whole call) and pw_gz_push from the scrape
 * thread; the pieces stay owned by Python, which keeps each alive until
 * pw_gz_done counts it (and lets it go then: the body is never whole in
 * memory when nobody asked for it plain).
 *
 * Built by kernel/Makefile against zlib; without the library the body is
 * deflated after the collection with Python's zlib, the same bytes.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

struct piece {
	const unsigned char *data;
	size_t len;
};

struct pw_gz {
	pthread_mutex_t lock;
	pthread_cond_t more;
	struct piece *pieces;	/* pushed so far; [taken, count) still to deflate */
	size_t count, cap, taken;
	size_t pending;		/* bytes pushed and not taken */
	size_t done;		/* pieces deflated: the caller may free [0, done) */
	int ended;		/* pw_gz_end was called: no more pieces */
	int waiting;		/* pw_gz_run waits for a piece: wake it */
	z_stream zs;
	unsigned char *out;	/* the member so far, zs.total_out bytes */
	size_t out_cap;
};

#define OUT_START (256u << 10)
/* A waiting pw_gz_run is woken once this much is pending (or at the end):
 * a futex wake per family piece (~300 a scrape) cost more than it saved. */
#define WAKE_BYTES (64u << 10)

struct pw_gz *pw_gz_new(int level)
{
	struct pw_gz *gz = calloc(1, sizeof(*gz));

	if (!gz)
		return NULL;
	/* 15 window bits + 16: a gzip header and trailer (zlib's deflateInit2) */
	if (deflateInit2(&gz->zs, level, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
		free(gz);
		return NULL;
	}
	pthread_mutex_init(&gz->lock, NULL);
	pthread_cond_init(&gz->more, NULL);
	return gz;
}

/* Queue `len` bytes at `data` (not copied: the caller keeps them alive until
 * pw_gz_run returns). 0, or ENOMEM / EINVAL (after the end). */
int pw_gz_push(struct pw_gz *gz, const void *data, size_t len)
{
	int err = 0;

	pthread_mutex_lock(&gz->lock);
	if (gz->ended) {
		err = EINVAL;
	} else if (gz->count == gz->cap) {
		size_t cap = gz->cap ? 2 * gz->cap : 64;
		struct piece *grown = realloc(gz->pieces, cap * sizeof(*grown));

		if (!grown)
			err = ENOMEM;
		else
			gz->pieces = grown, gz->cap = cap;
	}
	if (!err) {
		gz->pieces[gz->count++] = (struct piece){data, len};
		gz->pending += len;
		/* a busy pw_gz_run takes the piece when done with its own */
		if (gz->waiting && gz->pending >= WAKE_BYTES)
			pthread_cond_signal(&gz->more);
	}
	pthread_mutex_unlock(&gz->lock);
	return err;
}

/* No more pieces: pw_gz_run finishes the member once it has deflated the rest. */
void pw_gz_end(struct pw_gz *gz)
{
	pthread_mutex_lock(&gz->lock);
	gz->ended = 1;
	pthread_cond_signal(&gz->more);
	pthread_mutex_unlock(&gz->lock);
}

/* Room for deflate to write into: at least a quarter of what is there already. */
static int room(struct pw_gz *gz)
{
	size_t used = gz->zs.total_out;

	if (gz->out_cap - used < 1024 || !gz->out) {
		size_t cap = gz->out_cap ? gz->out_cap + gz->out_cap / 2 : OUT_START;
		unsigned char *grown = realloc(gz->out, cap);

		if (!grown)
			return -1;
		gz->out = grown, gz->out_cap = cap;
	}
	gz->zs.next_out = gz->out + used;
	gz->zs.avail_out = (uInt)(gz->out_cap - used > UINT32_MAX ? UINT32_MAX : gz->out_cap - used);
	return 0;
}

/* Deflate `len` bytes at `data` (flush Z_NO_FLUSH), or finish (Z_FINISH). */
static int deflate_all(struct pw_gz *gz, const unsigned char *data, size_t len, int flush)
{
	do {
		uInt step = len > UINT32_MAX ? UINT32_MAX : (uInt)len;
		int rc;

		gz->zs.next_in = (unsigned char *)data;
		gz->zs.avail_in = step;
		do {
			if (room(gz))
				return Z_MEM_ERROR;
			rc = deflate(&gz->zs, step == len ? flush : Z_NO_FLUSH);
			if (rc == Z_STREAM_ERROR)
				return rc;
		} while (gz->zs.avail_out == 0 || (step == len && flush == Z_FINISH && rc != Z_STREAM_END));
		data += step;
		len -= step;
	} while (len);
	return Z_OK;
}

/* Deflate the pieces as they are pushed, until pw_gz_end; then finish the
 * member. Z_OK, or zlib's error (the member is then not to be used). */
int pw_gz_run(struct pw_gz *gz)
{
	for (;;) {
		struct piece next;

		pthread_mutex_lock(&gz->lock);
		/* every piece taken: wait for enough bytes, or the end */
		while (gz->taken == gz->count && !gz->ended) {
			gz->waiting = 1;
			pthread_cond_wait(&gz->more, &gz->lock);
			gz->waiting = 0;
		}
		if (gz->taken == gz->count) {	/* ended, nothing left */
			pthread_mutex_unlock(&gz->lock);
			return deflate_all(gz, NULL, 0, Z_FINISH);
		}
		next = gz->pieces[gz->taken++];
		gz->pending -= next.len;
		pthread_mutex_unlock(&gz->lock);
		if (next.len) {
			int rc = deflate_all(gz, next.data, next.len, Z_NO_FLUSH);

			if (rc != Z_OK)
				return rc;
		}
		pthread_mutex_lock(&gz->lock);
		gz->done++;
		pthread_mutex_unlock(&gz->lock);
	}
}

/* How many pushed pieces pw_gz_run has deflated so far: the first `done`
 * pieces are not read again, their memory may go. */
size_t pw_gz_done(struct pw_gz *gz)
{
	size_t done;

	pthread_mutex_lock(&gz->lock);
	done = gz->done;
	pthread_mutex_unlock(&gz->lock);
	return done;
}

/* The member: its bytes at *data, their number returned. */
size_t pw_gz_output(struct pw_gz *gz, const void **data)
{
	*data = gz->out;
	return gz->zs.total_out;
}

void pw_gz_free(struct pw_gz *gz)
{
	if (!gz)
		return;
	deflateEnd(&gz->zs);
	pthread_mutex_destroy(&gz->lock);
	pthread_cond_destroy(&gz->more);
	free(gz->pieces);
	free(gz->out);
	free(gz);
}

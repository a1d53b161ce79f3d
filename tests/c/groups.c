/* braid_all_to_allv / braid_iall_to_allv (uneven and zero counts, argument errors, a count
 * mismatch), braid_comm_split (two colors with reversed keys, BRAID_SPLIT_NOCOLOR) and
 * braid_comm_create_group (a subset in reversed order); collectives on the parent and the new
 * communicators interleaved; new communicators outlive their parent. Closed-form values. */
#include "common.h"

#include <stdint.h>

static int rank, size;

/* Elements rank r sends to rank p (some zero, some large). */
static size_t cnt(int r, int p) {
    switch ((r + 2 * p) % 4) {
    case 0: return 0;
    case 1: return 1 + (size_t)r;
    case 2: return 20000 + (size_t)p;
    default: return 3 + 2 * (size_t)p;
    }
}

static int64_t val(int r, int p, size_t i) { return (int64_t)r * 1000000000 + p * 10000000 + (int64_t)i; }

/* One uneven all_to_allv on `c` (rank `me` of `n`), blocking or not; send blocks stored in
 * reverse order, receive blocks with a one-element gap before each (left untouched). */
static void uneven(braid_comm_t c, int me, int n, int nonblocking) {
    size_t* sc = malloc(n * sizeof *sc);
    size_t* sd = malloc(n * sizeof *sd);
    size_t* rc = malloc(n * sizeof *rc);
    size_t* rd = malloc(n * sizeof *rd);
    size_t at = 0;
    for (int p = n - 1; p >= 0; p--) {
        sc[p] = cnt(me, p);
        sd[p] = at;
        at += sc[p];
    }
    int64_t* s = malloc((at + 1) * sizeof *s);
    for (int p = 0; p < n; p++)
        for (size_t i = 0; i < sc[p]; i++) s[sd[p] + i] = val(me, p, i);
    at = 0;
    for (int p = 0; p < n; p++) {
        rc[p] = cnt(p, me);
        at += 1;
        rd[p] = at;
        at += rc[p];
    }
    size_t total = at + 1;
    int64_t* r = malloc(total * sizeof *r);
    for (size_t i = 0; i < total; i++) r[i] = -7;
    if (nonblocking) {
        braid_request_t req;
        CHECK(braid_iall_to_allv(s, sc, sd, r, rc, rd, braid_int64, c, &req));
        /* The arrays are read during the call only. */
        memset(sc, 0xff, n * sizeof *sc);
        memset(rd, 0xff, n * sizeof *rd);
        CHECK(braid_wait(req));
        CHECK(braid_request_free(req));
        for (int p = 0; p < n; p++) {
            rd[p] = 0;
            for (int q = 0; q < p; q++) rd[p] += 1 + cnt(q, me);
            rd[p] += 1;
        }
    } else {
        CHECK(braid_all_to_allv(s, sc, sd, r, rc, rd, braid_int64, c));
    }
    size_t next = 0;
    for (int p = 0; p < n; p++) {
        for (; next < rd[p]; next++) EXPECT(r[next] == -7, "gap at %zu: %lld", next, (long long)r[next]);
        for (size_t i = 0; i < rc[p]; i++, next++)
            EXPECT(r[next] == val(p, me, i), "from %d [%zu]: %lld", p, i, (long long)r[next]);
    }
    EXPECT(r[total - 1] == -7, "tail %lld", (long long)r[total - 1]);
    free(s), free(r), free(sc), free(sd), free(rc), free(rd);
}

static void all_to_allv_errors(braid_comm_t comm) {
    size_t* z = calloc(size, sizeof *z);
    size_t* one = malloc(size * sizeof *one);
    size_t* d = malloc(size * sizeof *d);
    for (int p = 0; p < size; p++) one[p] = 1, d[p] = (size_t)p;
    float* s = calloc(size, sizeof *s);
    float* r = calloc(size, sizeof *r);
    /* All counts zero: NULL buffers are fine. */
    CHECK(braid_all_to_allv(NULL, z, z, NULL, z, z, braid_float32, comm));
    EXPECT(braid_all_to_allv(s, NULL, d, r, one, d, braid_float32, comm) == braid_invalid_argument,
           "NULL sendcounts");
    EXPECT(braid_all_to_allv(s, one, d, r, one, NULL, braid_float32, comm) == braid_invalid_argument,
           "NULL rdispls");
    EXPECT(braid_all_to_allv(NULL, one, d, r, one, d, braid_float32, comm) == braid_invalid_argument,
           "NULL sendbuf");
    EXPECT(braid_all_to_allv(s, one, d, r, one, d, (braid_datatype_t)99, comm) == braid_invalid_argument,
           "bad datatype");
    /* In place is refused. */
    EXPECT(braid_all_to_allv(r, one, d, r, one, d, braid_float32, comm) == braid_invalid_argument,
           "in place");
    EXPECT(strstr(braid_get_last_error(), "in-place") != NULL, "%s", braid_get_last_error());
    /* Overlapping receive blocks (with 2+ ranks). */
    if (size > 1) {
        EXPECT(braid_all_to_allv(s, one, d, r, one, z, braid_float32, comm) == braid_invalid_argument,
               "overlapping receive blocks");
    }
    /* Not inside a group. */
    CHECK(braid_group_start());
    EXPECT(braid_all_to_allv(s, one, d, r, one, d, braid_float32, comm) == braid_invalid_usage,
           "inside a group");
    braid_comm_t none = NULL;
    EXPECT(braid_comm_split(comm, 0, 0, &none) == braid_invalid_usage && none == NULL,
           "split inside a group");
    CHECK(braid_group_end());
    /* Still usable: one element each way. */
    for (int p = 0; p < size; p++) s[p] = (float)(rank * 10 + p);
    CHECK(braid_all_to_allv(s, one, d, r, one, d, braid_float32, comm));
    for (int p = 0; p < size; p++) EXPECT(r[p] == (float)(p * 10 + rank), "r[%d]=%g", p, r[p]);
    free(z), free(one), free(d), free(s), free(r);
}

/* Every rank's rank in `parent`, gathered over `c`. */
static void parents_of(braid_comm_t c, int parent_rank, int* out) {
    int n;
    CHECK(braid_comm_size(c, &n));
    CHECK(braid_all_gather(&parent_rank, out, 1, braid_int32, c));
}

int main(void) {
    braid_comm_t comm = test_comm(&rank, &size);

    /* ---- all_to_allv on the world ---- */
    uneven(comm, rank, size, 0);
    uneven(comm, rank, size, 1);
    all_to_allv_errors(comm);

    /* ---- split: two colors, keys reversing the order ---- */
    braid_comm_t half = NULL;
    CHECK(braid_comm_split(comm, rank % 2, -rank, &half));
    EXPECT(half != NULL, "no communicator");
    int hr, hn;
    CHECK(braid_comm_rank(half, &hr));
    CHECK(braid_comm_size(half, &hn));
    int want_n = (size - rank % 2 + 1) / 2; /* ranks of my parity */
    EXPECT(hn == want_n, "split size %d, want %d", hn, want_n);
    int* par = malloc(size * sizeof *par);
    parents_of(half, rank, par);
    for (int i = 0; i < hn; i++) {
        /* largest rank of this parity first */
        int top = (size - 1) - ((size - 1 - rank % 2) % 2);
        EXPECT(par[i] == top - 2 * i, "split order: [%d]=%d", i, par[i]);
    }
    EXPECT(par[hr] == rank, "own rank");

    /* ---- split with BRAID_SPLIT_NOCOLOR on the last rank ---- */
    braid_comm_t most = (braid_comm_t)&most; /* must become NULL on the last rank */
    int color = rank == size - 1 && size > 1 ? BRAID_SPLIT_NOCOLOR : 3;
    CHECK(braid_comm_split(comm, color, 0, &most));
    EXPECT((most == NULL) == (color == BRAID_SPLIT_NOCOLOR), "NOCOLOR");
    braid_comm_t junk = (braid_comm_t)&junk;
    EXPECT(braid_comm_split(comm, -5, 0, &junk) == braid_invalid_argument && junk == NULL,
           "color -5");

    /* ---- create_group: every rank but 0, reversed; rank 0 waits on the parent ---- */
    braid_comm_t sub = NULL;
    if (rank > 0 || size == 1) {
        int m = size == 1 ? 1 : size - 1;
        int* ranks = malloc(m * sizeof *ranks);
        for (int i = 0; i < m; i++) ranks[i] = size == 1 ? 0 : size - 1 - i;
        /* Not a member: refused. */
        int bad[1] = {(rank + 1) % size};
        braid_comm_t x = (braid_comm_t)&x;
        if (size > 1) {
            EXPECT(braid_comm_create_group(comm, bad, 1, 0, &x) == braid_invalid_argument && x == NULL,
                   "non-member");
        }
        EXPECT(braid_comm_create_group(comm, ranks, m, -1, &x) == braid_invalid_argument, "tag -1");
        CHECK(braid_comm_create_group(comm, ranks, m, 9, &sub));
        int sr, sn;
        CHECK(braid_comm_rank(sub, &sr));
        CHECK(braid_comm_size(sub, &sn));
        EXPECT(sn == m && ranks[sr] == rank, "create_group rank %d size %d", sr, sn);
        for (int i = 0; i < 10; i++) {
            int64_t v = rank + i;
            CHECK(braid_all_reduce(&v, &v, 1, braid_int64, braid_sum, sub));
            int64_t want = 0;
            for (int k = 0; k < m; k++) want += ranks[k] + i;
            EXPECT(v == want, "sub all_reduce %lld want %lld", (long long)v, (long long)want);
        }
        uneven(sub, sr, sn, 0);
        free(ranks);
    }

    /* ---- interleaved collectives on the parent and the children ---- */
    for (int i = 0; i < 10; i++) {
        double x = rank + i;
        CHECK(braid_all_reduce(&x, &x, 1, braid_float64, braid_sum, comm));
        EXPECT(x == size * (size - 1) / 2.0 + size * i, "parent %g", x);
        int32_t y = rank;
        CHECK(braid_all_reduce(&y, &y, 1, braid_int32, braid_max, half));
        EXPECT(y == par[0], "half max %d", y);
        uneven(half, hr, hn, i % 2);
        if (most) uneven(most, rank, size > 1 ? size - 1 : 1, i % 2);
        if (sub) CHECK(braid_barrier(sub));
        uneven(comm, rank, size, i % 2);
    }

    /* ---- a count mismatch on a fresh communicator: rank 1 expects one more element from
     * rank 0 than rank 0 sends; both fail with "mismatch", the parent is unaffected ---- */
    if (size >= 2) {
        braid_comm_t mm = NULL;
        CHECK(braid_comm_split(comm, 0, 0, &mm));
        size_t* sc = malloc(size * sizeof *sc);
        size_t* rc = malloc(size * sizeof *rc);
        size_t* d = malloc(size * sizeof *d);
        for (int p = 0; p < size; p++) sc[p] = rc[p] = 4, d[p] = 8 * (size_t)p;
        if (rank == 1) rc[0] = 5;
        float* s = calloc(8 * size, sizeof *s);
        float* r = calloc(8 * size, sizeof *r);
        braid_status_t st = braid_all_to_allv(s, sc, d, r, rc, d, braid_float32, mm);
        if (rank <= 1) {
            EXPECT(st != braid_success, "rank %d: mismatched all_to_allv succeeded", rank);
        }
        if (st != braid_success) {
            const char* msg = braid_get_last_error();
            EXPECT(strstr(msg, "mismatch") != NULL, "rank %d: '%s'", rank, msg);
            fprintf(stderr, "rank %d got %s: %s\n", rank, braid_status_string(st), msg);
        }
        /* Everyone keeps the failed communicator until all have their result. */
        CHECK(braid_barrier(comm));
        CHECK(braid_comm_destroy(mm));
        free(sc), free(rc), free(d), free(s), free(r);
    }

    /* ---- children outlive the parent ---- */
    CHECK(braid_comm_destroy(comm));
    uneven(half, hr, hn, 0);
    CHECK(braid_barrier(half));
    CHECK(braid_comm_destroy(half));
    if (most) {
        CHECK(braid_barrier(most));
        CHECK(braid_comm_destroy(most));
    }
    if (sub) {
        int sr, sn;
        CHECK(braid_comm_rank(sub, &sr));
        CHECK(braid_comm_size(sub, &sn));
        uneven(sub, sr, sn, 1);
        CHECK(braid_comm_destroy(sub));
    }
    free(par);
    printf("groups ok (rank %d of %d)\n", rank, size);
    return 0;
}

/* Every collective over a sample of datatypes and operators, out of place and in place;
 * results checked against closed forms. Rank r contributes values derived from r. */
#include "common.h"

#include <stdint.h>

#define N 1003 /* not divisible by 2, 3 or 4 */

static int rank, size;
static braid_comm_t comm;

/* sum over ranks of (r + 1) * k, as double */
static double sum_ranks1(void) { return (double)size * (size + 1) / 2.0; }

static void all_reduce_int32(void) {
    int32_t* s = malloc(N * sizeof *s);
    int32_t* r = malloc(N * sizeof *r);
    for (int i = 0; i < N; i++) s[i] = (rank + 1) * (i % 7 + 1);
    CHECK(braid_all_reduce(s, r, N, braid_int32, braid_sum, comm));
    for (int i = 0; i < N; i++)
        EXPECT(r[i] == (int32_t)sum_ranks1() * (i % 7 + 1), "sum[%d]=%d", i, r[i]);
    CHECK(braid_all_reduce(s, r, N, braid_int32, braid_max, comm));
    for (int i = 0; i < N; i++) EXPECT(r[i] == size * (i % 7 + 1), "max[%d]=%d", i, r[i]);
    CHECK(braid_all_reduce(s, r, N, braid_int32, braid_min, comm));
    for (int i = 0; i < N; i++) EXPECT(r[i] == (i % 7 + 1), "min[%d]=%d", i, r[i]);
    /* in place, prod of (r+1) = size! */
    int32_t fact = 1;
    for (int k = 2; k <= size; k++) fact *= k;
    for (int i = 0; i < N; i++) r[i] = rank + 1;
    CHECK(braid_all_reduce(r, r, N, braid_int32, braid_prod, comm));
    for (int i = 0; i < N; i++) EXPECT(r[i] == fact, "prod[%d]=%d", i, r[i]);
    free(s);
    free(r);
}

static void all_reduce_float(void) {
    float* f = malloc(N * sizeof *f);
    double* d = malloc(N * sizeof *d);
    uint64_t* u = malloc(N * sizeof *u);
    uint8_t* b = malloc(N);
    for (int i = 0; i < N; i++) {
        f[i] = (float)(rank + 1) * 0.5f;
        d[i] = (double)(rank + 1) * i;
        u[i] = (uint64_t)(rank + 1) << 33;
        b[i] = (uint8_t)(rank + 1);
    }
    CHECK(braid_all_reduce(f, f, N, braid_float32, braid_avg, comm));
    CHECK(braid_all_reduce(d, d, N, braid_float64, braid_sum, comm));
    CHECK(braid_all_reduce(u, u, N, braid_uint64, braid_sum, comm));
    CHECK(braid_all_reduce(b, b, N, braid_uint8, braid_max, comm));
    for (int i = 0; i < N; i++) {
        EXPECT(f[i] == (float)(sum_ranks1() * 0.5 / size), "avg[%d]=%g", i, f[i]);
        EXPECT(d[i] == sum_ranks1() * i, "dsum[%d]=%g", i, d[i]);
        EXPECT(u[i] == ((uint64_t)sum_ranks1() << 33), "usum[%d]", i);
        EXPECT(b[i] == size, "bmax[%d]=%d", i, b[i]);
    }
    /* float16: 1.0 is 0x3C00; the sum of `size` ones (size <= 4) is exact. */
    static const uint16_t half_of[] = {0x0000, 0x3C00, 0x4000, 0x4200, 0x4400};
    uint16_t h[8], hb[8];
    for (int i = 0; i < 8; i++) h[i] = 0x3C00, hb[i] = 0x3F80; /* bf16 1.0 */
    CHECK(braid_all_reduce(h, h, 8, braid_float16, braid_sum, comm));
    CHECK(braid_all_reduce(hb, hb, 8, braid_bfloat16, braid_max, comm));
    for (int i = 0; i < 8; i++) {
        EXPECT(h[i] == half_of[size], "f16 sum[%d]=0x%04x", i, h[i]);
        EXPECT(hb[i] == 0x3F80, "bf16 max[%d]=0x%04x", i, hb[i]);
    }
    free(f);
    free(d);
    free(u);
    free(b);
}

static void reduce_scatter(void) {
    size_t rc = 257;
    int64_t* s = malloc(rc * size * sizeof *s);
    int64_t* r = malloc(rc * sizeof *r);
    for (size_t i = 0; i < rc * size; i++) s[i] = (int64_t)i * (rank + 1);
    CHECK(braid_reduce_scatter(s, r, rc, braid_int64, braid_sum, comm));
    for (size_t i = 0; i < rc; i++) {
        int64_t idx = (int64_t)(rank * rc + i);
        EXPECT(r[i] == idx * (int64_t)sum_ranks1(), "rs[%zu]=%lld", i, (long long)r[i]);
    }
    /* in place: recvbuf == sendbuf + rank*recvcount */
    for (size_t i = 0; i < rc * size; i++) s[i] = (int64_t)i * (rank + 1);
    CHECK(braid_reduce_scatter(s, s + rank * rc, rc, braid_int64, braid_sum, comm));
    for (size_t i = 0; i < rc; i++) {
        int64_t idx = (int64_t)(rank * rc + i);
        EXPECT(s[rank * rc + i] == idx * (int64_t)sum_ranks1(), "rs inplace[%zu]", i);
    }
    free(s);
    free(r);
}

static void all_gather(void) {
    size_t sc = 101;
    uint32_t* s = malloc(sc * sizeof *s);
    uint32_t* r = malloc(sc * size * sizeof *r);
    for (size_t i = 0; i < sc; i++) s[i] = (uint32_t)(rank * 1000 + i);
    CHECK(braid_all_gather(s, r, sc, braid_uint32, comm));
    for (int p = 0; p < size; p++)
        for (size_t i = 0; i < sc; i++)
            EXPECT(r[p * sc + i] == (uint32_t)(p * 1000 + i), "ag[%d][%zu]", p, i);
    /* in place: sendbuf == recvbuf + rank*sendcount */
    memset(r, 0, sc * size * sizeof *r);
    memcpy(r + rank * sc, s, sc * sizeof *s);
    CHECK(braid_all_gather(r + rank * sc, r, sc, braid_uint32, comm));
    for (int p = 0; p < size; p++)
        for (size_t i = 0; i < sc; i++)
            EXPECT(r[p * sc + i] == (uint32_t)(p * 1000 + i), "ag inplace[%d][%zu]", p, i);
    free(s);
    free(r);
}

static void broadcast_reduce(void) {
    int root = size - 1;
    double* b = malloc(N * sizeof *b);
    for (int i = 0; i < N; i++) b[i] = rank == root ? i * 1.5 : -1.0;
    CHECK(braid_broadcast(b, b, N, braid_float64, root, comm)); /* in place */
    for (int i = 0; i < N; i++) EXPECT(b[i] == i * 1.5, "bcast[%d]=%g", i, b[i]);
    int8_t src[5] = {1, 2, 3, 4, 5}, dst[5] = {0};
    CHECK(braid_broadcast(rank == 0 ? src : NULL, dst, 5, braid_int8, 0, comm));
    for (int i = 0; i < 5; i++) EXPECT(dst[i] == i + 1, "bcast i8[%d]=%d", i, dst[i]);

    int32_t s[3] = {rank, rank * 2, -rank}, r[3] = {0, 0, 0};
    CHECK(braid_reduce(s, rank == root ? r : NULL, 3, braid_int32, braid_sum, root, comm));
    if (rank == root) {
        int t = size * (size - 1) / 2;
        EXPECT(r[0] == t && r[1] == 2 * t && r[2] == -t, "reduce %d %d %d", r[0], r[1], r[2]);
    }
    CHECK(braid_reduce(s, s, 3, braid_int32, braid_min, 0, comm)); /* in place */
    if (rank == 0) EXPECT(s[0] == 0 && s[1] == 0 && s[2] == -(size - 1), "reduce min");
    free(b);
}

static void all_to_all_gather_scatter(void) {
    size_t c = 33;
    int32_t* s = malloc(c * size * sizeof *s);
    int32_t* r = malloc(c * size * sizeof *r);
    for (int p = 0; p < size; p++)
        for (size_t i = 0; i < c; i++) s[p * c + i] = rank * 10000 + p * 100 + (int)i;
    CHECK(braid_all_to_all(s, r, c, braid_int32, comm));
    for (int p = 0; p < size; p++)
        for (size_t i = 0; i < c; i++)
            EXPECT(r[p * c + i] == p * 10000 + rank * 100 + (int)i, "a2a[%d][%zu]", p, i);
    CHECK(braid_all_to_all(s, s, c, braid_int32, comm)); /* in place */
    EXPECT(memcmp(s, r, c * size * sizeof *s) == 0, "a2a in place differs");

    int root = size > 1 ? 1 : 0;
    int32_t mine[4] = {rank, rank + 1, rank + 2, rank + 3};
    memset(r, 0, c * size * sizeof *r);
    CHECK(braid_gather(mine, rank == root ? r : NULL, 4, braid_int32, root, comm));
    if (rank == root)
        for (int p = 0; p < size; p++)
            for (int i = 0; i < 4; i++) EXPECT(r[p * 4 + i] == p + i, "gather[%d][%d]", p, i);

    for (int p = 0; p < size; p++)
        for (int i = 0; i < 4; i++) s[p * 4 + i] = p * 10 + i;
    int32_t got[4] = {0};
    CHECK(braid_scatter(rank == root ? s : NULL, got, 4, braid_int32, root, comm));
    for (int i = 0; i < 4; i++) EXPECT(got[i] == rank * 10 + i, "scatter[%d]=%d", i, got[i]);
    free(s);
    free(r);
}

/* Buffers from braid_mem_alloc (single-copy path on one host when large enough). */
static void all_reduce_registered(void) {
    const size_t M = 300007; /* > 1 MiB of floats, not divisible by 2, 3 or 4 */
    float *s = NULL, *r = NULL;
    CHECK(braid_mem_alloc(comm, M * sizeof *s, (void**)&s));
    CHECK(braid_mem_alloc(comm, M * sizeof *r, (void**)&r));
    EXPECT(s != NULL && r != NULL && ((uintptr_t)s & 4095) == 0, "braid_mem_alloc");
    for (size_t i = 0; i < M; i++) s[i] = (float)((rank + 1) * (i % 11));
    CHECK(braid_all_reduce(s, r, M, braid_float32, braid_sum, comm));
    for (size_t i = 0; i < M; i++)
        EXPECT(r[i] == (float)(sum_ranks1() * (i % 11)), "reg sum[%zu]=%g", i, r[i]);
    CHECK(braid_all_reduce(r, r, M, braid_float32, braid_max, comm)); /* in place */
    for (size_t i = 0; i < M; i++)
        EXPECT(r[i] == (float)(sum_ranks1() * (i % 11)), "reg max[%zu]=%g", i, r[i]);
    CHECK(braid_mem_free(comm, s));
    CHECK(braid_mem_free(comm, r));
    EXPECT(braid_mem_free(comm, r) == braid_invalid_argument, "double free is refused");
    CHECK(braid_mem_free(comm, NULL));
}

int main(void) {
    comm = test_comm(&rank, &size);
    all_reduce_registered();
    all_reduce_int32();
    all_reduce_float();
    reduce_scatter();
    all_gather();
    broadcast_reduce();
    all_to_all_gather_scatter();
    CHECK(braid_all_reduce(NULL, NULL, 0, braid_float32, braid_sum, comm)); /* zero length */
    CHECK(braid_barrier(comm));
    CHECK(braid_comm_destroy(comm));
    printf("collectives ok (rank %d of %d)\n", rank, size);
    return 0;
}

/* Non-blocking collectives overlapped with work: several operations in flight, polled with
 * braid_test while computing, then waited; every braid_i* form is exercised. */
#include "common.h"

#include <stdint.h>

#define N (1 << 18)

int main(void) {
    int rank, size;
    braid_comm_t comm = test_comm(&rank, &size);
    float* a = malloc(N * sizeof *a);
    float* b = malloc(N * sizeof *b);
    for (int i = 0; i < N; i++) a[i] = 1.0f, b[i] = (float)rank;

    braid_request_t r1 = NULL, r2 = NULL;
    CHECK(braid_iall_reduce(a, a, N, braid_float32, braid_sum, comm, &r1));
    CHECK(braid_iall_reduce(b, b, N, braid_float32, braid_max, comm, &r2));
    /* Work while the operations run. */
    volatile double work = 0;
    int done1 = 0, done2 = 0, polls = 0;
    while (!(done1 && done2)) {
        for (int k = 0; k < 10000; k++) work += k * 0.5;
        if (!done1) CHECK(braid_test(r1, &done1));
        if (!done2) CHECK(braid_test(r2, &done2));
        polls++;
    }
    CHECK(braid_test(r1, &done1)); /* after completion: still done, same status */
    EXPECT(done1 == 1, "done1");
    CHECK(braid_request_free(r1));
    CHECK(braid_request_free(r2));
    for (int i = 0; i < N; i++) {
        EXPECT(a[i] == (float)size, "iall_reduce[%d]=%g", i, a[i]);
        EXPECT(b[i] == (float)(size - 1), "iall_reduce max[%d]=%g", i, b[i]);
    }

    /* Every other non-blocking form, all in flight at once, then freed without braid_wait
     * (braid_request_free waits for an incomplete operation). */
    int c = 16, root = size - 1;
    int32_t *rs_s = malloc(c * size * sizeof(int32_t)), rs_r[16];
    int32_t ag_s[16], *ag_r = malloc(c * size * sizeof(int32_t));
    int32_t bc[16], rd_s[16], rd_r[16];
    int32_t *a2a_s = malloc(c * size * sizeof(int32_t)), *a2a_r = malloc(c * size * sizeof(int32_t));
    int32_t g_s[16], *g_r = malloc(c * size * sizeof(int32_t));
    int32_t *sc_s = malloc(c * size * sizeof(int32_t)), sc_r[16];
    for (int i = 0; i < c * size; i++) rs_s[i] = 1, a2a_s[i] = rank * 1000 + i, sc_s[i] = i;
    for (int i = 0; i < c; i++) ag_s[i] = rank, bc[i] = rank == root ? 42 : 0, rd_s[i] = rank, g_s[i] = rank + i;
    braid_request_t req[9];
    CHECK(braid_ireduce_scatter(rs_s, rs_r, c, braid_int32, braid_sum, comm, &req[0]));
    CHECK(braid_iall_gather(ag_s, ag_r, c, braid_int32, comm, &req[1]));
    CHECK(braid_ibroadcast(bc, bc, c, braid_int32, root, comm, &req[2]));
    CHECK(braid_ireduce(rd_s, rd_r, c, braid_int32, braid_max, root, comm, &req[3]));
    CHECK(braid_iall_to_all(a2a_s, a2a_r, c, braid_int32, comm, &req[4]));
    CHECK(braid_igather(g_s, g_r, c, braid_int32, root, comm, &req[5]));
    CHECK(braid_iscatter(sc_s, sc_r, c, braid_int32, root, comm, &req[6]));
    CHECK(braid_ibarrier(comm, &req[7]));
    CHECK(braid_ibarrier(comm, &req[8]));
    for (int i = 0; i < 9; i++) CHECK(braid_request_free(req[i]));
    for (int i = 0; i < c; i++) {
        EXPECT(rs_r[i] == size, "ireduce_scatter");
        EXPECT(bc[i] == 42, "ibroadcast");
        EXPECT(sc_r[i] == rank * c + i, "iscatter[%d]=%d", i, sc_r[i]);
        if (rank == root) EXPECT(rd_r[i] == size - 1, "ireduce");
    }
    for (int p = 0; p < size; p++)
        for (int i = 0; i < c; i++) {
            EXPECT(ag_r[p * c + i] == p, "iall_gather");
            EXPECT(a2a_r[p * c + i] == p * 1000 + rank * c + i, "iall_to_all");
            if (rank == root) EXPECT(g_r[p * c + i] == p + i, "igather");
        }
    /* A blocking call after non-blocking ones runs after them. */
    CHECK(braid_iall_reduce(a, a, N, braid_float32, braid_sum, comm, &r1));
    CHECK(braid_barrier(comm));
    int d = 0;
    CHECK(braid_test(r1, &d));
    EXPECT(d == 1, "the barrier ran before the earlier iall_reduce completed");
    CHECK(braid_request_free(r1));
    CHECK(braid_comm_destroy(comm));
    free(a), free(b), free(rs_s), free(ag_r), free(a2a_s), free(a2a_r), free(g_r), free(sc_s);
    printf("nonblocking ok (rank %d of %d, %d polls)\n", rank, size, polls);
    return 0;
}

/* Point-to-point: a ring exchange with grouped send/recv, nested groups, blocking pairs,
 * braid_isend/braid_irecv, out-of-order tags, and receives from any source. Uses braid_comm_init_rank with the coordinator braid-run exports. */
#include "common.h"

#include <stdint.h>

#define N 4099

int main(void) {
    const char* env_rank = getenv("BRAID_RANK");
    const char* env_size = getenv("BRAID_WORLD_SIZE");
    EXPECT(env_rank && env_size, "run under braid-run");
    int rank = atoi(env_rank), size = atoi(env_size);
    braid_comm_t comm = NULL;
    CHECK(braid_comm_init_rank(&comm, size, rank, getenv("BRAID_COORDINATOR")));
    int r2 = -1, n2 = -1;
    CHECK(braid_comm_rank(comm, &r2));
    CHECK(braid_comm_size(comm, &n2));
    EXPECT(r2 == rank && n2 == size, "rank %d size %d", r2, n2);

    int next = (rank + 1) % size, prev = (rank + size - 1) % size;
    float* out = malloc(N * sizeof *out);
    float* in = malloc(N * sizeof *in);
    for (int i = 0; i < N; i++) out[i] = (float)(rank * N + i);

    /* Ring: every rank sends to next and receives from prev at once (would deadlock with
     * blocking calls for large messages). */
    for (int round = 0; round < 3; round++) {
        memset(in, 0, N * sizeof *in);
        CHECK(braid_group_start());
        CHECK(braid_send(out, N, braid_float32, next, 7, comm));
        CHECK(braid_group_start()); /* nested: only the outer end runs the group */
        CHECK(braid_recv(in, N, braid_float32, prev, 7, comm));
        CHECK(braid_group_end());
        CHECK(braid_group_end());
        for (int i = 0; i < N; i++)
            EXPECT(in[i] == (float)(prev * N + i), "ring round %d [%d]=%g", round, i, in[i]);
    }

    /* Blocking pairs 0 <-> 1 with two tags. */
    if (size >= 2 && rank < 2) {
        int64_t a[3] = {rank, 10 + rank, 20 + rank}, b[3] = {0};
        int other = 1 - rank;
        if (rank == 0) {
            CHECK(braid_send(a, 3, braid_int64, other, 1, comm));
            CHECK(braid_recv(b, 3, braid_int64, other, 2, comm));
        } else {
            CHECK(braid_recv(b, 3, braid_int64, other, 1, comm));
            CHECK(braid_send(a, 3, braid_int64, other, 2, comm));
        }
        EXPECT(b[0] == other && b[1] == 10 + other && b[2] == 20 + other, "pair");
    }

    /* Non-blocking ring. */
    braid_request_t rs = NULL, rr = NULL;
    memset(in, 0, N * sizeof *in);
    CHECK(braid_irecv(in, N, braid_float32, prev, 9, comm, &rr));
    CHECK(braid_isend(out, N, braid_float32, next, 9, comm, &rs));
    CHECK(braid_wait(rs));
    CHECK(braid_wait(rr));
    CHECK(braid_wait(rr)); /* again: same status */
    CHECK(braid_request_free(rs));
    CHECK(braid_request_free(rr));
    for (int i = 0; i < N; i++) EXPECT(in[i] == (float)(prev * N + i), "iring[%d]", i);

    /* Out-of-order tags: tag 21 then 22 sent, 22 then 21 received (blocking receives after
     * non-blocking sends: the receives join them in flight). */
    {
        int32_t x[2] = {rank, 1}, y[5] = {rank, 2, 2, 2, 2}, gx[2] = {0}, gy[5] = {0};
        braid_request_t sx = NULL, sy = NULL;
        CHECK(braid_isend(x, 2, braid_int32, next, 21, comm, &sx));
        CHECK(braid_isend(y, 5, braid_int32, next, 22, comm, &sy));
        CHECK(braid_recv(gy, 5, braid_int32, prev, 22, comm));
        CHECK(braid_recv(gx, 2, braid_int32, prev, 21, comm));
        CHECK(braid_wait(sx));
        CHECK(braid_wait(sy));
        CHECK(braid_request_free(sx));
        CHECK(braid_request_free(sy));
        EXPECT(gx[0] == prev && gx[1] == 1 && gy[0] == prev && gy[4] == 2, "tag order");
    }

    /* Any source: rank 0 receives one message with tag 30 from every other rank, blocking and
     * non-blocking, and learns each sender. */
    if (rank == 0) {
        int seen[64] = {0};
        for (int k = 1; k < size; k++) {
            int64_t v[2] = {-1, -1};
            int src = -1;
            if (k % 2) {
                CHECK(braid_recv_any(v, 2, braid_int64, 30, comm, &src));
            } else {
                braid_request_t r = NULL;
                CHECK(braid_irecv_any(v, 2, braid_int64, 30, comm, &r));
                EXPECT(braid_request_source(r, NULL) == braid_invalid_argument, "NULL source");
                CHECK(braid_wait(r));
                CHECK(braid_request_source(r, &src));
                CHECK(braid_request_free(r));
            }
            EXPECT(src > 0 && src < size && src < 64 && !seen[src], "any source: src %d", src);
            seen[src] = 1;
            EXPECT(v[0] == src && v[1] == 100 + src, "any source: from %d got %lld",
                   src, (long long)v[0]);
        }
    } else {
        int64_t v[2] = {rank, 100 + rank};
        CHECK(braid_send(v, 2, braid_int64, 0, 30, comm));
    }
    /* A request of another kind has no source. */
    {
        braid_request_t r = NULL;
        int src = -1;
        CHECK(braid_ibarrier(comm, &r));
        CHECK(braid_wait(r));
        EXPECT(braid_request_source(r, &src) == braid_invalid_usage, "barrier source");
        CHECK(braid_request_free(r));
    }

    /* An empty group is fine. */
    CHECK(braid_group_start());
    CHECK(braid_group_end());

    CHECK(braid_barrier(comm));
    CHECK(braid_comm_destroy(comm));
    free(out);
    free(in);
    printf("p2p ok (rank %d of %d)\n", rank, size);
    return 0;
}

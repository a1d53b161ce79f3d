#define _POSIX_C_SOURCE 200809L
/* What a torch.distributed backend over the C ABI needs beyond the basics: int16, the bitwise
 * operators (and their refusal on floats, before anything is sent), braid_wait_for,
 * braid_igroup_end, and a coordinator started with braid_coordinator_start that communicators
 * of this process then join through braid_comm_init. Runs on 1-3 ranks under braid-run. */
#include "common.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>

#define EXPECT_STATUS(call, want, needle)                                                    \
    do {                                                                                     \
        braid_status_t st_ = (call);                                                         \
        const char* msg_ = braid_get_last_error();                                           \
        EXPECT(st_ == (want), "%s: got %s (%s)", #call, braid_status_string(st_), msg_);     \
        EXPECT(msg_ != NULL && strstr(msg_, (needle)) != NULL, "%s: message '%s' lacks '%s'", \
               #call, msg_, (needle));                                                       \
    } while (0)

#define N 1031 /* not divisible by 2 or 3 */

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void sleep_s(double s) {
    struct timespec t = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&t, &t) != 0) {
    }
}

/* int16: sum (with wrap-around), avg, max, in place and out of place, zero length. */
static void int16_ops(braid_comm_t comm, int rank, int size) {
    int16_t x[N], y[N];
    for (int i = 0; i < N; i++) x[i] = (int16_t)((rank + 1) * (i % 100 + 1));
    CHECK(braid_all_reduce(x, y, N, braid_int16, braid_sum, comm));
    for (int i = 0; i < N; i++) {
        int want = (i % 100 + 1) * size * (size + 1) / 2;
        EXPECT(y[i] == want, "int16 sum [%d] = %d, want %d", i, y[i], want);
    }
    CHECK(braid_all_reduce(x, x, N, braid_int16, braid_max, comm));
    for (int i = 0; i < N; i++) EXPECT(x[i] == size * (i % 100 + 1), "int16 max [%d]", i);
    for (int i = 0; i < N; i++) x[i] = 30000;
    CHECK(braid_all_reduce(x, x, N, braid_int16, braid_sum, comm));
    int16_t wrapped = (int16_t)(uint16_t)(30000u * (unsigned)size);
    for (int i = 0; i < N; i++) EXPECT(x[i] == wrapped, "int16 wraps: %d vs %d", x[i], wrapped);
    for (int i = 0; i < N; i++) x[i] = (int16_t)(rank == 0 ? -7 : 7 * rank);
    CHECK(braid_all_reduce(x, y, N, braid_int16, braid_avg, comm));
    int s = -7;
    for (int r = 1; r < size; r++) s += 7 * r;
    EXPECT(y[0] == s / size, "int16 avg %d, want %d", y[0], s / size);
    CHECK(braid_all_reduce(NULL, NULL, 0, braid_int16, braid_sum, comm));
    /* Other collectives move int16 too. */
    int16_t b[3] = {(int16_t)(rank == 0 ? -32768 : 0), 1, 2};
    CHECK(braid_broadcast(b, b, 3, braid_int16, 0, comm));
    EXPECT(b[0] == -32768 && b[2] == 2, "int16 broadcast");
}

/* Bitwise operators: rank r holds h | 1 << r, h = (i % 16) << 4; closed forms as in
 * core/tests/inprocess.rs. int32 and uint8 blocking, int16 non-blocking. */
static void bitwise_ops(braid_comm_t comm, int rank, int size) {
    int low = (1 << size) - 1;
    int32_t a[N], o[N];
    uint8_t u[N], uo[N];
    for (int i = 0; i < N; i++) {
        a[i] = ((i % 16) << 4) | (1 << rank);
        u[i] = (uint8_t)a[i];
    }
    CHECK(braid_all_reduce(a, o, N, braid_int32, braid_band, comm));
    for (int i = 0; i < N; i++)
        EXPECT(o[i] == (((i % 16) << 4) | (size == 1)), "band [%d] = %d", i, o[i]);
    CHECK(braid_all_reduce(a, o, N, braid_int32, braid_bor, comm));
    for (int i = 0; i < N; i++) EXPECT(o[i] == (((i % 16) << 4) | low), "bor [%d]", i);
    CHECK(braid_all_reduce(u, uo, N, braid_uint8, braid_bxor, comm));
    for (int i = 0; i < N; i++)
        EXPECT(uo[i] == (uint8_t)(((size % 2) ? (i % 16) << 4 : 0) | low), "bxor [%d] = %d", i,
               uo[i]);
    int16_t h[N];
    for (int i = 0; i < N; i++) h[i] = (int16_t)(0x7000 | (1 << rank));
    braid_request_t req = NULL;
    CHECK(braid_iall_reduce(h, h, N, braid_int16, braid_bor, comm, &req));
    CHECK(braid_wait(req));
    CHECK(braid_request_free(req));
    for (int i = 0; i < N; i++) EXPECT(h[i] == (0x7000 | low), "int16 bor [%d]", i);
    /* Reduce and reduce-scatter take the bitwise operators too. */
    int64_t r64[3] = {-1, 1 << rank, 0x10}, r64o[3] = {0, 0, 0};
    CHECK(braid_reduce(r64, r64o, 3, braid_int64, braid_band, size - 1, comm));
    if (rank == size - 1)
        EXPECT(r64o[0] == -1 && r64o[1] == (size == 1 ? 1 : 0) && r64o[2] == 0x10, "reduce band");
}

/* A bitwise operator on a floating-point datatype: braid_invalid_argument naming both, before
 * anything is sent (every rank does the same calls; had anything been sent, the following
 * collectives would mismatch), and the communicator stays usable. */
static void float_bitwise_refused(braid_comm_t comm, int size) {
    float f[5] = {1, 2, 3, 4, 5}, g[5] = {9, 9, 9, 9, 9};
    double d[5] = {0};
    uint16_t half[5] = {0};
    EXPECT_STATUS(braid_all_reduce(f, g, 5, braid_float32, braid_band, comm),
                  braid_invalid_argument, "band");
    EXPECT(strstr(braid_get_last_error(), "float") != NULL, "names the datatype: %s",
           braid_get_last_error());
    EXPECT(g[0] == 9 && g[4] == 9, "nothing written");
    EXPECT_STATUS(braid_all_reduce(d, d, 5, braid_float64, braid_bxor, comm),
                  braid_invalid_argument, "bxor");
    EXPECT_STATUS(braid_all_reduce(half, half, 5, braid_float16, braid_bor, comm),
                  braid_invalid_argument, "bor");
    EXPECT_STATUS(braid_all_reduce(half, half, 5, braid_bfloat16, braid_band, comm),
                  braid_invalid_argument, "bfloat16");
    EXPECT_STATUS(braid_reduce(f, g, 5, braid_float32, braid_bor, 0, comm),
                  braid_invalid_argument, "bor");
    braid_request_t req = (braid_request_t)0x1;
    EXPECT_STATUS(braid_iall_reduce(f, f, 5, braid_float32, braid_bxor, comm, &req),
                  braid_invalid_argument, "bxor");
    EXPECT(req == NULL, "*req is NULL after a refused call");
    EXPECT_STATUS(braid_all_reduce(f, g, 5, braid_float32, (braid_redop_t)8, comm),
                  braid_invalid_argument, "op 8");
    EXPECT_STATUS(braid_all_reduce(f, g, 5, (braid_datatype_t)11, braid_sum, comm),
                  braid_invalid_argument, "datatype 11");
    CHECK(braid_all_reduce(f, g, 5, braid_float32, braid_sum, comm));
    EXPECT(g[4] == 5.0f * (float)size, "usable afterwards: %f", g[4]);
}

/* braid_wait_for: an all-reduce that cannot complete within 0.2 s because rank 1 joins it
 * 2 s late, then completes. */
static void wait_for(braid_comm_t comm, int rank, int size) {
    int32_t v[N];
    for (int i = 0; i < N; i++) v[i] = rank + i;
    braid_request_t req = NULL;
    int done = -1;
    if (size > 1 && rank == 1) sleep_s(2.0);
    CHECK(braid_iall_reduce(v, v, N, braid_int32, braid_sum, comm, &req));
    if (size > 1 && rank != 1) {
        double t0 = now_s();
        CHECK(braid_wait_for(req, 0.2, &done));
        double dt = now_s() - t0;
        EXPECT(done == 0, "not done within 0.2 s while rank 1 sleeps");
        EXPECT(dt >= 0.19 && dt < 1.5, "waited %.3f s for a 0.2 s timeout", dt);
        CHECK(braid_wait_for(req, 0.0, &done));
        EXPECT(done == 0, "timeout 0 polls");
    }
    CHECK(braid_wait_for(req, 60.0, &done));
    EXPECT(done == 1, "done within 60 s");
    for (int i = 0; i < N; i++) {
        int32_t want = size * (size - 1) / 2 + size * i;
        EXPECT(v[i] == want, "sum [%d] = %d, want %d", i, v[i], want);
    }
    done = -1;
    CHECK(braid_wait_for(req, 0.0, &done)); /* again: same status */
    EXPECT(done == 1, "still done");
    EXPECT_STATUS(braid_wait_for(req, -1.0, &done), braid_invalid_argument, "timeout_s");
    EXPECT(done == 0, "*done is 0 after an argument error");
    EXPECT_STATUS(braid_wait_for(req, NAN, &done), braid_invalid_argument, "timeout_s");
    EXPECT_STATUS(braid_wait_for(req, 1.0, NULL), braid_invalid_argument, "done is NULL");
    EXPECT_STATUS(braid_wait_for(NULL, 1.0, &done), braid_invalid_argument, "req is NULL");
    CHECK(braid_request_free(req));
    /* INFINITY waits as braid_wait does. */
    CHECK(braid_ibarrier(comm, &req));
    CHECK(braid_wait_for(req, INFINITY, &done));
    EXPECT(done == 1, "done after an unbounded wait");
    CHECK(braid_request_free(req));
}

/* braid_igroup_end: a ring exchange started non-blocking, and its error rules. */
static void igroup(braid_comm_t comm, int rank, int size) {
    braid_request_t req = (braid_request_t)0x1;
    EXPECT_STATUS(braid_igroup_end(&req), braid_invalid_usage, "without braid_group_start");
    EXPECT(req == NULL, "*req NULL");
    /* An empty group: a request that is already complete. */
    CHECK(braid_group_start());
    CHECK(braid_igroup_end(&req));
    int done = 0;
    CHECK(braid_test(req, &done));
    EXPECT(done == 1, "empty group done");
    CHECK(braid_request_free(req));
    /* Nested: refused (the group stays open), NULL req: refused (the group stays open). */
    CHECK(braid_group_start());
    CHECK(braid_group_start());
    EXPECT_STATUS(braid_igroup_end(&req), braid_invalid_usage, "outermost");
    EXPECT(req == NULL, "*req NULL");
    CHECK(braid_group_end());
    EXPECT_STATUS(braid_igroup_end(NULL), braid_invalid_argument, "req is NULL");
    CHECK(braid_group_end());
    EXPECT_STATUS(braid_group_end(), braid_invalid_usage, "without braid_group_start");
    /* A failed call inside: nothing runs, its status comes back. */
    float junk = 0;
    CHECK(braid_group_start());
    EXPECT_STATUS(braid_send(&junk, 1, braid_float32, size, 0, comm), braid_invalid_argument,
                  "peer");
    EXPECT_STATUS(braid_igroup_end(&req), braid_invalid_argument, "group not run");
    EXPECT(req == NULL, "*req NULL");
    if (size < 2) return;
    int next = (rank + 1) % size, prev = (rank + size - 1) % size;
    enum { M = 70000 };
    static int32_t out1[M], in1[M];
    int16_t out2[7], in2[7];
    for (int i = 0; i < M; i++) out1[i] = rank * 100000 + i;
    for (int i = 0; i < 7; i++) out2[i] = (int16_t)(-rank - i);
    CHECK(braid_group_start());
    CHECK(braid_send(out1, M, braid_int32, next, 1, comm));
    CHECK(braid_recv(in1, M, braid_int32, prev, 1, comm));
    CHECK(braid_recv(in2, 7, braid_int16, prev, 2, comm));
    CHECK(braid_send(out2, 7, braid_int16, next, 2, comm));
    CHECK(braid_igroup_end(&req));
    EXPECT(req != NULL, "a request");
    CHECK(braid_wait_for(req, 60.0, &done));
    EXPECT(done == 1, "ring done");
    CHECK(braid_request_free(req));
    for (int i = 0; i < M; i++) EXPECT(in1[i] == prev * 100000 + i, "ring [%d]", i);
    for (int i = 0; i < 7; i++) EXPECT(in2[i] == -prev - i, "ring tag 2 [%d]", i);
    /* Collectives after it stay in order. */
    CHECK(braid_barrier(comm));
}

/* A coordinator of this process, joined by two communicators on two threads. */
#define TOKEN "c-test-token"
static char coord_addr[64];

static void* member(void* arg) {
    int me = (int)(intptr_t)arg;
    braid_config_t cfg = BRAID_CONFIG_INITIALIZER;
    cfg.coordinator = coord_addr;
    cfg.world_size = 2;
    cfg.rank = me;
    cfg.job_token = TOKEN;
    cfg.timeout_s = 60.0;
    braid_comm_t c = NULL;
    CHECK(braid_comm_init(&c, &cfg));
    int r = -1, n = -1;
    CHECK(braid_comm_rank(c, &r));
    CHECK(braid_comm_size(c, &n));
    EXPECT(r == me && n == 2, "rank %d size %d", r, n);
    int16_t x[5] = {(int16_t)(me + 1), 3, 4, 5, (int16_t)(1 << me)};
    CHECK(braid_all_reduce(x, x, 4, braid_int16, braid_sum, c));
    EXPECT(x[0] == 3 && x[1] == 6 && x[3] == 10, "sum over the coordinator's group");
    CHECK(braid_all_reduce(x + 4, x + 4, 1, braid_int16, braid_bor, c));
    EXPECT(x[4] == 3, "bor over the coordinator's group");
    CHECK(braid_comm_destroy(c));
    return NULL;
}

static void coordinator(void) {
    braid_coordinator_t co = (braid_coordinator_t)0x1;
    int port = 0;
    EXPECT_STATUS(braid_coordinator_start(NULL, NULL, NULL), braid_invalid_argument,
                  "coord is NULL");
    EXPECT_STATUS(braid_coordinator_port(NULL, &port), braid_invalid_argument, "coord is NULL");
    CHECK(braid_coordinator_destroy(NULL));
    /* NULL address: all interfaces, a free port. */
    CHECK(braid_coordinator_start(NULL, NULL, &co));
    CHECK(braid_coordinator_port(co, &port));
    EXPECT(port > 0 && port < 65536, "port %d", port);
    EXPECT_STATUS(braid_coordinator_port(co, NULL), braid_invalid_argument, "port is NULL");
    CHECK(braid_coordinator_destroy(co));

    CHECK(braid_coordinator_start("127.0.0.1:0", TOKEN, &co));
    CHECK(braid_coordinator_port(co, &port));
    snprintf(coord_addr, sizeof coord_addr, "127.0.0.1:%d", port);
    /* Its port is taken: a second one there fails. */
    braid_coordinator_t co2 = (braid_coordinator_t)0x1;
    EXPECT_STATUS(braid_coordinator_start(coord_addr, NULL, &co2), braid_system_error, "bind");
    EXPECT(co2 == NULL, "*coord NULL after a failed start");
    /* A wrong token is refused. */
    braid_config_t bad = BRAID_CONFIG_INITIALIZER;
    bad.coordinator = coord_addr;
    bad.world_size = 2;
    bad.rank = 0;
    bad.job_token = "not-the-token";
    bad.timeout_s = 10.0;
    braid_comm_t badc = (braid_comm_t)0x1;
    braid_status_t st = braid_comm_init(&badc, &bad);
    EXPECT(st != braid_success && badc == NULL, "wrong token: %s (%s)", braid_status_string(st),
           braid_get_last_error());
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        EXPECT(pthread_create(&t[i], NULL, member, (void*)(intptr_t)i) == 0, "pthread_create");
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    CHECK(braid_coordinator_destroy(co));
}

int main(void) {
    int rank, size;
    braid_comm_t comm = test_comm(&rank, &size);
    int16_ops(comm, rank, size);
    bitwise_ops(comm, rank, size);
    float_bitwise_refused(comm, size);
    wait_for(comm, rank, size);
    igroup(comm, rank, size);
    coordinator();
    CHECK(braid_barrier(comm));
    CHECK(braid_comm_destroy(comm));
    printf("backend ok (rank %d of %d)\n", rank, size);
    return 0;
}

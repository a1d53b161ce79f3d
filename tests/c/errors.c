#define _POSIX_C_SOURCE 200809L
/* Invalid arguments and usage: the right status and a message, never a crash; the
 * communicator stays usable after argument errors; abort makes later calls fail (sticky). */
#include "common.h"

#include <stdint.h>

#define EXPECT_STATUS(call, want, needle)                                                    \
    do {                                                                                     \
        braid_status_t st_ = (call);                                                         \
        const char* msg_ = braid_get_last_error();                                           \
        EXPECT(st_ == (want), "%s: got %s (%s)", #call, braid_status_string(st_), msg_);     \
        EXPECT(msg_ != NULL && strstr(msg_, (needle)) != NULL, "%s: message '%s' lacks '%s'", \
               #call, msg_, (needle));                                                       \
    } while (0)

int main(void) {
    int v = 0;
    CHECK(braid_get_version(&v));
    EXPECT(v == BRAID_VERSION_CODE, "version %d", v);
    EXPECT(strlen(braid_get_last_error()) == 0, "no error yet");
    EXPECT(strstr(braid_status_string(braid_timeout), "timeout") != NULL, "status string");
    EXPECT(strstr(braid_status_string((braid_status_t)99), "unknown") != NULL, "unknown");
    EXPECT_STATUS(braid_get_version(NULL), braid_invalid_argument, "version is NULL");
    EXPECT_STATUS(braid_config_init(NULL), braid_invalid_argument, "config is NULL");
    EXPECT_STATUS(braid_comm_init(NULL, NULL), braid_invalid_argument, "comm is NULL");

    braid_config_t cfg = BRAID_CONFIG_INITIALIZER, cfg2;
    CHECK(braid_config_init(&cfg2));
    /* Field by field: the struct has padding, which neither form initialises. */
    EXPECT(cfg.size == cfg2.size && cfg.version == cfg2.version &&
           cfg.coordinator == cfg2.coordinator && cfg.world_size == cfg2.world_size &&
           cfg.rank == cfg2.rank && cfg.timeout_s == cfg2.timeout_s &&
           cfg.transport == cfg2.transport && cfg.job_token == cfg2.job_token &&
           cfg2.world_size == -1 && cfg2.rank == -1,
           "initializer and braid_config_init agree");
    braid_comm_t bad = (braid_comm_t)0x1;
    cfg2.size = 4; /* too small */
    EXPECT_STATUS(braid_comm_init(&bad, &cfg2), braid_invalid_argument, "config->size");
    EXPECT(bad == NULL, "*comm is NULL after a failed init");
    CHECK(braid_config_init(&cfg2));
    cfg2.world_size = -5;
    EXPECT_STATUS(braid_comm_init(&bad, &cfg2), braid_invalid_argument, "world_size");
    CHECK(braid_config_init(&cfg2));
    cfg2.transport = "carrier-pigeon";
    EXPECT_STATUS(braid_comm_init(&bad, &cfg2), braid_invalid_argument, "carrier-pigeon");
    EXPECT_STATUS(braid_comm_init_rank(&bad, 0, 0, NULL), braid_invalid_argument, "nranks");
    EXPECT_STATUS(braid_comm_init_rank(&bad, 2, 2, NULL), braid_invalid_argument, "rank 2");

    /* A real communicator from a config whose unset fields come from the environment. */
    cfg.timeout_s = 60.0;
    cfg.job_token = NULL; /* braid-run's coordinator runs without a job token */
    braid_comm_t comm = NULL;
    CHECK(braid_comm_init(&comm, &cfg));
    int rank, size;
    CHECK(braid_comm_rank(comm, &rank));
    CHECK(braid_comm_size(comm, &size));

    float x[4] = {1, 2, 3, 4}, y[4];
    EXPECT_STATUS(braid_comm_rank(NULL, &rank), braid_invalid_argument, "comm is NULL");
    EXPECT_STATUS(braid_comm_rank(comm, NULL), braid_invalid_argument, "rank is NULL");
    EXPECT_STATUS(braid_comm_size(comm, NULL), braid_invalid_argument, "size is NULL");
    EXPECT_STATUS(braid_all_reduce(x, y, 4, braid_float32, braid_sum, NULL),
                  braid_invalid_argument, "comm is NULL");
    EXPECT_STATUS(braid_all_reduce(NULL, y, 4, braid_float32, braid_sum, comm),
                  braid_invalid_argument, "NULL");
    EXPECT_STATUS(braid_all_reduce(x, NULL, 4, braid_float32, braid_sum, comm),
                  braid_invalid_argument, "NULL");
    EXPECT_STATUS(braid_all_reduce(x, y, 4, (braid_datatype_t)42, braid_sum, comm),
                  braid_invalid_argument, "datatype 42");
    EXPECT_STATUS(braid_all_reduce(x, y, 4, braid_float32, (braid_redop_t)-3, comm),
                  braid_invalid_argument, "op -3");
    EXPECT_STATUS(braid_broadcast(x, y, 4, braid_float32, size, comm), braid_invalid_argument,
                  "root");
    EXPECT_STATUS(braid_reduce(x, y, 4, braid_float32, braid_sum, -1, comm),
                  braid_invalid_argument, "root -1");
    EXPECT_STATUS(braid_send(x, 4, braid_float32, size, 0, comm), braid_invalid_argument,
                  "peer");
    EXPECT_STATUS(braid_recv(NULL, 4, braid_float32, 0, 0, comm), braid_invalid_argument,
                  "buf is NULL");
    EXPECT_STATUS(braid_iall_reduce(x, y, 4, braid_float32, braid_sum, comm, NULL),
                  braid_invalid_argument, "req is NULL");
    braid_request_t req = (braid_request_t)0x1;
    EXPECT_STATUS(braid_iall_reduce(x, y, 4, braid_float32, (braid_redop_t)77, comm, &req),
                  braid_invalid_argument, "op 77");
    EXPECT(req == NULL, "*req is NULL after a failed call");
    EXPECT_STATUS(braid_wait(NULL), braid_invalid_argument, "req is NULL");
    int done;
    EXPECT_STATUS(braid_test(NULL, &done), braid_invalid_argument, "req is NULL");
    CHECK(braid_request_free(NULL));
    CHECK(braid_comm_destroy(NULL));

    /* Group misuse. */
    EXPECT_STATUS(braid_group_end(), braid_invalid_usage, "without braid_group_start");
    CHECK(braid_group_start());
    EXPECT_STATUS(braid_all_reduce(x, y, 4, braid_float32, braid_sum, comm), braid_invalid_usage,
                  "group");
    EXPECT_STATUS(braid_isend(x, 4, braid_float32, 0, 0, comm, &req), braid_invalid_usage,
                  "inside a group");
    EXPECT_STATUS(braid_group_end(), braid_invalid_usage, "group not run");

    /* After argument errors the communicator still works. */
    for (int i = 0; i < 4; i++) y[i] = 0;
    CHECK(braid_all_reduce(x, y, 4, braid_float32, braid_sum, comm));
    for (int i = 0; i < 4; i++) EXPECT(y[i] == x[i] * size, "y[%d]=%g", i, y[i]);

    /* A second communicator in the same process (another rendezvous group), and a group that
     * mixes the two is refused. */
    setenv("BRAID_GROUP", "second", 1);
    braid_comm_t comm2 = NULL;
    CHECK(braid_comm_init(&comm2, NULL));
    CHECK(braid_all_reduce(x, y, 4, braid_float32, braid_max, comm2));
    CHECK(braid_group_start());
    CHECK(braid_send(x, 1, braid_float32, 0, 0, comm));
    EXPECT_STATUS(braid_send(x, 1, braid_float32, 0, 0, comm2), braid_invalid_usage,
                  "one communicator");
    EXPECT_STATUS(braid_group_end(), braid_invalid_usage, "one communicator");
    CHECK(braid_comm_destroy(comm2));

    /* Abort: later calls fail with the sticky error; destroy still works. A peer's abort may
     * reach this rank first (then the sticky error is that remote abort). */
    braid_status_t st = braid_barrier(comm);
    EXPECT(st == braid_success || st == braid_remote_error, "barrier: %s",
           braid_get_last_error());
    CHECK(braid_comm_abort(comm));
    st = braid_all_reduce(x, y, 4, braid_float32, braid_sum, comm);
    EXPECT(st == braid_invalid_usage || st == braid_remote_error, "after abort: %s",
           braid_status_string(st));
    EXPECT(strstr(braid_get_last_error(), "abort") != NULL, "after abort: %s",
           braid_get_last_error());
    EXPECT(braid_barrier(comm) == st, "sticky: %s", braid_get_last_error());
    CHECK(braid_comm_destroy(comm));
    printf("errors ok (rank %d of %d)\n", rank, size);
    return 0;
}

/* Device-buffer entry points on a machine WITHOUT a CUDA driver (CI has none): every _stream
 * form, the device allocator and braid_cuda_available give a clear braid_system_error naming
 * the missing driver (never a crash), NULL handles are still braid_invalid_argument, a group
 * holding a failed device call does not run, and the host forms keep working. On a machine
 * with a driver (perf/gpu_check covers that) this program only checks that the reason, if any,
 * is not empty. */
#include "common.h"

#define NODRV "no CUDA driver (libcuda.so.1 not found)"

static int has_driver(void) {
    char info[256] = {0};
    braid_status_t st = braid_cuda_available(info, sizeof info);
    if (st == braid_success) {
        printf("cuda: %s\n", info);
        return 1;
    }
    EXPECT(st == braid_system_error, "braid_cuda_available -> %s", braid_status_string(st));
    EXPECT(strstr(braid_get_last_error(), "braid_cuda_available") != NULL, "%s",
           braid_get_last_error());
    return 0;
}

static void expect_nodrv(braid_status_t st, const char* what) {
    EXPECT(st == braid_system_error, "%s -> %s: %s", what, braid_status_string(st),
           braid_get_last_error());
    EXPECT(strstr(braid_get_last_error(), NODRV) != NULL, "%s: %s", what, braid_get_last_error());
}

int main(void) {
    int rank, size;
    braid_comm_t comm = test_comm(&rank, &size);
    if (has_driver()) {
        printf("cuda ok (driver present: the no-driver checks do not apply)\n");
        CHECK(braid_comm_destroy(comm));
        return 0;
    }
    EXPECT(strstr(braid_get_last_error(), NODRV) != NULL, "%s", braid_get_last_error());
    float a[64], b[64];
    for (int i = 0; i < 64; i++) a[i] = (float)(rank + 1);
    void* dptr = (void*)0x1;
    expect_nodrv(braid_mem_alloc_device(1024, &dptr), "braid_mem_alloc_device");
    EXPECT(dptr == (void*)0x1, "ptr written on failure");
    EXPECT(braid_mem_alloc_device(16, NULL) == braid_invalid_argument, "NULL ptr");
    EXPECT(braid_mem_free_device(NULL) == braid_success, "free NULL");
    expect_nodrv(braid_all_reduce_stream(a, b, 64, braid_float32, braid_sum, comm, NULL), "all_reduce_stream");
    expect_nodrv(braid_reduce_scatter_stream(a, b, 64 / size, braid_float32, braid_sum, comm, NULL), "reduce_scatter_stream");
    expect_nodrv(braid_all_gather_stream(a, b, 64 / size, braid_float32, comm, NULL), "all_gather_stream");
    expect_nodrv(braid_broadcast_stream(a, b, 64, braid_float32, 0, comm, NULL), "broadcast_stream");
    expect_nodrv(braid_reduce_stream(a, b, 64, braid_float32, braid_max, 0, comm, NULL), "reduce_stream");
    expect_nodrv(braid_all_to_all_stream(a, b, 64 / size, braid_float32, comm, NULL), "all_to_all_stream");
    expect_nodrv(braid_gather_stream(a, b, 64 / size, braid_float32, 0, comm, NULL), "gather_stream");
    expect_nodrv(braid_scatter_stream(a, b, 64 / size, braid_float32, 0, comm, NULL), "scatter_stream");
    expect_nodrv(braid_barrier_stream(comm, NULL), "barrier_stream");
    size_t counts[4] = {1, 1, 1, 1}, displs[4] = {0, 1, 2, 3};
    expect_nodrv(braid_all_to_allv_stream(a, counts, displs, b, counts, displs, braid_float32, comm, NULL), "all_to_allv_stream");
    if (size > 1) {
        int peer = (rank + 1) % size;
        expect_nodrv(braid_send_stream(a, 4, braid_float32, peer, 7, comm, NULL), "send_stream");
        expect_nodrv(braid_recv_stream(b, 4, braid_float32, peer, 7, comm, NULL), "recv_stream");
        /* A group holding a failed device call does not run; the host path still works after. */
        CHECK(braid_group_start());
        expect_nodrv(braid_send_stream(a, 4, braid_float32, peer, 7, comm, NULL), "send_stream in a group");
        braid_status_t st = braid_group_end();
        EXPECT(st == braid_system_error, "group_end -> %s", braid_status_string(st));
        EXPECT(strstr(braid_get_last_error(), "group not run") != NULL, "%s", braid_get_last_error());
    }
    /* NULL handles: argument errors first. */
    EXPECT(braid_all_reduce_stream(a, b, 64, braid_float32, braid_sum, NULL, NULL) == braid_invalid_argument, "NULL comm");
    EXPECT(braid_all_reduce_stream(a, b, 64, (braid_datatype_t)99, braid_sum, comm, NULL) == braid_invalid_argument, "bad dtype");
    braid_status_t async = braid_internal_error;
    CHECK(braid_comm_get_async_error(comm, &async));
    EXPECT(async == braid_success, "async error %s", braid_status_string(async));
    EXPECT(braid_comm_get_async_error(comm, NULL) == braid_invalid_argument, "NULL out");
    /* Host forms are untouched. */
    CHECK(braid_all_reduce(a, b, 64, braid_float32, braid_sum, comm));
    for (int i = 0; i < 64; i++) EXPECT(b[i] == (float)(size * (size + 1) / 2), "b[%d] = %f", i, b[i]);
    CHECK(braid_comm_destroy(comm));
    printf("cuda ok\n");
    return 0;
}

/* Mismatched collectives fail on every rank: rank 0 all-reduces 1000 elements, the others
 * 1001; every rank gets a non-success status and a message mentioning the mismatch, and the
 * error is sticky. */
#include "common.h"

int main(void) {
    int rank, size;
    braid_comm_t comm = test_comm(&rank, &size);
    size_t n = rank == 0 ? 1000 : 1001;
    float* buf = calloc(1001, sizeof *buf);
    braid_status_t st = braid_all_reduce(buf, buf, n, braid_float32, braid_sum, comm);
    const char* msg = braid_get_last_error();
    EXPECT(st != braid_success, "rank %d: mismatched all_reduce succeeded", rank);
    EXPECT(strstr(msg, "mismatch") != NULL, "rank %d: %s: '%s'", rank, braid_status_string(st),
           msg);
    fprintf(stderr, "rank %d got %s: %s\n", rank, braid_status_string(st), msg);
    st = braid_barrier(comm);
    EXPECT(st != braid_success, "sticky error expected, barrier succeeded");
    CHECK(braid_comm_destroy(comm));
    free(buf);
    printf("mismatch ok (rank %d of %d)\n", rank, size);
    return 0;
}

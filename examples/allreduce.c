/* Minimal braid program: every rank contributes rank+1; all-reduce sums them.
 *
 *   make install PREFIX=$HOME/.local
 *   export PKG_CONFIG_PATH=$HOME/.local/lib/pkgconfig LD_LIBRARY_PATH=$HOME/.local/lib
 *   cc -std=c11 -o allreduce examples/allreduce.c $(pkg-config --cflags --libs braid)
 *   ./target/release/braid-run -n 4 ./allreduce
 */
#include <braid.h>
#include <stdio.h>

int main(void) {
    braid_comm_t comm;
    if (braid_comm_init(&comm, NULL) != braid_success) { /* rank, size, coordinator: env */
        fprintf(stderr, "braid_comm_init: %s\n", braid_get_last_error());
        return 1;
    }
    int rank, size;
    braid_comm_rank(comm, &rank);
    braid_comm_size(comm, &size);

    float x[4];
    for (int i = 0; i < 4; i++) x[i] = (float)(rank + 1);
    braid_status_t st = braid_all_reduce(x, x, 4, braid_float32, braid_sum, comm); /* in place */
    if (st != braid_success) {
        fprintf(stderr, "braid_all_reduce: %s: %s\n", braid_status_string(st),
                braid_get_last_error());
        braid_comm_abort(comm);
        braid_comm_destroy(comm);
        return 1;
    }
    float want = size * (size + 1) / 2.0f;
    printf("rank %d of %d: sum = %g (expected %g)\n", rank, size, x[0], want);
    braid_comm_destroy(comm);
    return x[0] == want ? 0 : 1;
}

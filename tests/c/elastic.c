/* Elastic membership through the C ABI: run under `braid-run -n 2 --join 1@1`. The two initial
 * ranks loop; the joiner is admitted at their next braid_comm_update, receives the state with
 * braid_sync_from_oldest, and all three run 20 more steps together. */
#include <stdint.h>

#include "common.h"

int main(void) {
    int rank, size;
    braid_comm_t comm = test_comm(&rank, &size);
    uint64_t id, epoch;
    CHECK(braid_comm_member_id(comm, &id));
    CHECK(braid_comm_epoch(comm, &epoch));
    uint64_t state[4] = {0, 0, 0, 0};
    if (epoch == 1) state[0] = 42; /* initial members hold the state; a joiner does not */
    CHECK(braid_sync_from_oldest(state, 4, braid_uint64, comm));
    EXPECT(state[0] == 42, "state %llu after the first sync", (unsigned long long)state[0]);
    int since = 0, changes = 0;
    for (;;) {
        uint64_t one = 1, n = 0;
        CHECK(braid_all_reduce(&one, &n, 1, braid_uint64, braid_sum, comm));
        EXPECT(n == (uint64_t)size, "sum %llu on %d ranks", (unsigned long long)n, size);
        uint32_t done = (size == 3 && since >= 20), any = 0;
        CHECK(braid_all_reduce(&done, &any, 1, braid_uint32, braid_max, comm));
        if (any) break;
        int changed = 0;
        CHECK(braid_comm_update(comm, &changed));
        if (changed) {
            changes++;
            CHECK(braid_comm_rank(comm, &rank));
            CHECK(braid_comm_size(comm, &size));
            CHECK(braid_sync_from_oldest(state, 4, braid_uint64, comm));
            EXPECT(state[0] == 42, "state %llu after a view change", (unsigned long long)state[0]);
            since = 0;
        } else {
            since++;
        }
    }
    int left = 1;
    CHECK(braid_comm_has_left(comm, &left));
    EXPECT(left == 0, "has_left %d", left);
    CHECK(braid_comm_epoch(comm, &epoch));
    EXPECT(epoch == 2 && size == 3, "epoch %llu size %d", (unsigned long long)epoch, size);
    printf("elastic ok (member %llu rank %d of %d, %d view change(s))\n", (unsigned long long)id,
           rank, size, changes);
    CHECK(braid_comm_destroy(comm));
    return 0;
}

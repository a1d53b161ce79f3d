/* Helpers shared by the C test programs (run under braid-run; see capi/tests/c_programs.rs). */
#ifndef BRAID_TEST_COMMON_H
#define BRAID_TEST_COMMON_H

#include <braid.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(call)                                                                          \
    do {                                                                                     \
        braid_status_t st_ = (call);                                                         \
        if (st_ != braid_success) {                                                          \
            fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call,              \
                    braid_status_string(st_), braid_get_last_error());                       \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

#define EXPECT(cond, ...)                                                                    \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "%s:%d: expected %s: ", __FILE__, __LINE__, #cond);              \
            fprintf(stderr, __VA_ARGS__);                                                    \
            fprintf(stderr, "\n");                                                           \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

/* Creates a communicator from the environment (braid-run). */
static inline braid_comm_t test_comm(int* rank, int* size) {
    braid_comm_t comm = NULL;
    CHECK(braid_comm_init(&comm, NULL));
    CHECK(braid_comm_rank(comm, rank));
    CHECK(braid_comm_size(comm, size));
    return comm;
}

#endif

/* Push/pull through the C ABI: 2 servers (BRAID_RUN_INDEX 0, 1) and 2 workers (2, 3) of one
 * group, run by capi/tests/c_programs.rs under `braid-run -n 4` with BRAID_GROUP set,
 * BRAID_PS_MODE=sync and a small BRAID_PS_PARTITION_BYTES (so the large key is split over
 * both servers).
 *
 * Workers: init 3 float keys of different lengths and one int64 key; rounds of push_pull with
 * exact expected values; a pull with min_version (non-blocking, completed by the next round);
 * argument errors (wrong length for a known key names the key, wrong datatype, bad
 * min_version, NULL pointers, unsupported datatype).
 * With BRAID_KV_TEST_CALLBACK=1 the servers start with a C update rule
 * value += 2 * grad (overriding BRAID_PS_RULE) and the workers expect its values.
 *
 * Servers have no end-of-job signal from the group, so workers create
 * $BRAID_KV_TEST_DIR/done-<index> when they are done and the servers wait for both files. */
#define _POSIX_C_SOURCE 200809L

#include <stdatomic.h>
#include <time.h>

#include "common.h"

#define NKEYS 3
#define TOTAL 1005 /* 4 + 1000 + 1 */
#define NINT 3
#define ROUNDS 4
#define NSERVERS 2
#define NWORKERS 2

static const uint64_t keys[NKEYS] = {1, 2, 3};
static const size_t lens[NKEYS] = {4, 1000, 1};
static const uint64_t ikey = 10;
static const size_t ilen = NINT;
static const int64_t iinit[NINT] = {100, 200, 300};

static atomic_long calls;

/* The C update rule: value += 2 * grad (float32 and int64; anything else is refused). */
static int add_twice(uint64_t key, braid_datatype_t dtype, void* value, const void* grad,
                     size_t bytes, void* user) {
    (void)key;
    atomic_fetch_add((atomic_long*)user, 1);
    if (dtype == braid_float32) {
        float* v = value;
        const float* g = grad;
        for (size_t i = 0; i < bytes / sizeof(float); i++) v[i] += 2.0f * g[i];
        return 0;
    }
    if (dtype == braid_int64) {
        int64_t* v = value;
        const int64_t* g = grad;
        for (size_t i = 0; i < bytes / sizeof(int64_t); i++) v[i] += 2 * g[i];
        return 0;
    }
    return 1;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void done_path(char* buf, size_t n, int index) {
    const char* dir = getenv("BRAID_KV_TEST_DIR");
    EXPECT(dir != NULL, "BRAID_KV_TEST_DIR is set");
    snprintf(buf, n, "%s/done-%d", dir, index);
}

/* Expected float value of element i after round r (r = 0: the init value). Worker w pushes
 * (w + 1) * (i + r), so a round's sum is 3 * (i + r). */
static float expect_f(int cb, size_t i, int r) {
    if (!cb) return r == 0 ? (float)i : 3.0f * (float)(i + (size_t)r);
    /* value_r = value_{r-1} + 2 * 3 * (i + r) */
    return (float)i + 6.0f * (float)((size_t)r * i + (size_t)(r * (r + 1) / 2));
}

static int64_t expect_i(int cb, size_t j, int r) {
    int64_t s = 3 * 1000 * ((int64_t)j + r);
    if (!cb) return r == 0 ? iinit[j] : s;
    return iinit[j] + 6000 * ((int64_t)r * (int64_t)j + r * (r + 1) / 2);
}

static void check_round(int cb, const float* out, const int64_t* iout, int r) {
    for (size_t i = 0; i < TOTAL; i++) {
        EXPECT(out[i] == expect_f(cb, i, r), "round %d element %zu: %g, want %g", r, i,
               (double)out[i], (double)expect_f(cb, i, r));
    }
    for (size_t j = 0; j < NINT; j++) {
        EXPECT(iout[j] == expect_i(cb, j, r), "round %d int element %zu: %lld, want %lld", r, j,
               (long long)iout[j], (long long)expect_i(cb, j, r));
    }
}

/* One sync round: push_pull of the float keys and of the int key, both in flight at once. */
static void round_trip(braid_kv_worker_t kv, int w, int r, float* out, int64_t* iout) {
    static float g[TOTAL];
    int64_t gi[NINT];
    for (size_t i = 0; i < TOTAL; i++) g[i] = (float)(w + 1) * (float)(i + (size_t)r);
    for (size_t j = 0; j < NINT; j++) gi[j] = (int64_t)(w + 1) * ((int64_t)j + r) * 1000;
    braid_kv_request_t a = NULL, b = NULL;
    CHECK(braid_kv_push_pull(kv, keys, lens, NKEYS, g, out, braid_float32, 0, &a));
    CHECK(braid_kv_push_pull(kv, &ikey, &ilen, 1, gi, iout, braid_int64, 1, &b));
    /* The gradients were copied by the calls: scribbling on them changes nothing. */
    memset(g, 0xff, sizeof g);
    uint64_t va = 0, vb = 0;
    CHECK(braid_kv_wait(a, &va));
    CHECK(braid_kv_wait(b, &vb));
    EXPECT(va == (uint64_t)r && vb == (uint64_t)r, "versions %llu %llu, want %d",
           (unsigned long long)va, (unsigned long long)vb, r);
    CHECK(braid_kv_request_free(a));
    CHECK(braid_kv_request_free(b));
}

static void expect_error(braid_status_t st, braid_status_t want, const char* what,
                         const char* needle1, const char* needle2) {
    const char* e = braid_get_last_error();
    EXPECT(st == want, "%s: %s, want %s (%s)", what, braid_status_string(st),
           braid_status_string(want), e);
    EXPECT(strstr(e, needle1) != NULL, "%s: message names \"%s\": %s", what, needle1, e);
    EXPECT(needle2 == NULL || strstr(e, needle2) != NULL, "%s: message names \"%s\": %s", what,
           needle2, e);
}

static void worker(int index, int cb) {
    int w = index - NSERVERS;
    braid_kv_worker_t kv = NULL;
    CHECK(braid_kv_worker_start(&kv, NULL));
    EXPECT(kv != NULL, "a worker");

    static float init[TOTAL], out[TOTAL];
    int64_t iout[NINT];
    for (size_t i = 0; i < TOTAL; i++) init[i] = (float)i;
    CHECK(braid_kv_init(kv, keys, lens, NKEYS, init, braid_float32));
    CHECK(braid_kv_init(kv, &ikey, &ilen, 1, iinit, braid_int64));

    /* Version 0 (the init values) is there at once. */
    braid_kv_request_t req = NULL;
    uint64_t v = 99;
    CHECK(braid_kv_pull(kv, keys, lens, NKEYS, out, braid_float32, 0, 0, &req));
    CHECK(braid_kv_wait(req, &v));
    CHECK(braid_kv_request_free(req));
    EXPECT(v == 0, "init version %llu", (unsigned long long)v);
    for (size_t i = 0; i < TOTAL; i++) EXPECT(out[i] == (float)i, "init element %zu", i);

    for (int r = 1; r <= ROUNDS; r++) {
        round_trip(kv, w, r, out, iout);
        check_round(cb, out, iout, r);
    }

    /* A pull with min_version = the current version returns at once. */
    memset(out, 0, sizeof out);
    CHECK(braid_kv_pull(kv, keys, lens, NKEYS, out, braid_float32, ROUNDS, 0, &req));
    CHECK(braid_kv_wait(req, &v));
    CHECK(braid_kv_wait(req, &v)); /* again: same outcome */
    CHECK(braid_kv_request_free(req));
    EXPECT(v == ROUNDS, "min_version pull: version %llu", (unsigned long long)v);
    for (size_t i = 0; i < TOTAL; i++) {
        EXPECT(out[i] == expect_f(cb, i, ROUNDS), "min_version pull element %zu", i);
    }

    /* A pull of the next version cannot complete before this worker pushed into that round. */
    static float next[TOTAL];
    braid_kv_request_t pending = NULL;
    CHECK(braid_kv_pull(kv, keys, lens, NKEYS, next, braid_float32, ROUNDS + 1, 0, &pending));
    int done = -1;
    CHECK(braid_kv_test(pending, &done));
    EXPECT(done == 0, "pull of version %d done before its round", ROUNDS + 1);
    round_trip(kv, w, ROUNDS + 1, out, iout);
    check_round(cb, out, iout, ROUNDS + 1);
    for (int i = 0; i < 2000 && done == 0; i++) {
        CHECK(braid_kv_test(pending, &done));
        if (!done) sleep_ms(5);
    }
    EXPECT(done == 1, "pull of version %d completes after its round", ROUNDS + 1);
    CHECK(braid_kv_wait(pending, &v));
    CHECK(braid_kv_request_free(pending));
    EXPECT(v == ROUNDS + 1, "pending pull: version %llu", (unsigned long long)v);
    for (size_t i = 0; i < TOTAL; i++) {
        EXPECT(next[i] == expect_f(cb, i, ROUNDS + 1), "pending pull element %zu", i);
    }

    /* Argument errors: reported before anything is sent; *req is NULL afterwards. */
    float five[5] = {0};
    size_t five_len = 5;
    req = (braid_kv_request_t)&done; /* garbage that must be overwritten */
    expect_error(braid_kv_push(kv, keys, &five_len, 1, five, braid_float32, 0, &req),
                 braid_invalid_argument, "wrong length", "braid_kv_push", "key 1");
    EXPECT(req == NULL, "req is NULL after a failed push");
    int32_t ints[4] = {0};
    expect_error(braid_kv_pull(kv, keys, lens, 1, ints, braid_int32, -1, 0, &req),
                 braid_invalid_argument, "wrong datatype", "key 1", "int32");
    expect_error(braid_kv_pull(kv, keys, lens, 1, out, braid_float32, -2, 0, &req),
                 braid_invalid_argument, "bad min_version", "braid_kv_pull", "min_version");
    expect_error(braid_kv_push(kv, keys, lens, 1, NULL, braid_float32, 0, &req),
                 braid_invalid_argument, "NULL vals", "braid_kv_push", "vals is NULL");
    expect_error(braid_kv_pull(kv, keys, lens, 1, NULL, braid_float32, -1, 0, &req),
                 braid_invalid_argument, "NULL out", "braid_kv_pull", "out is NULL");
    expect_error(braid_kv_push(kv, keys, lens, 1, out, braid_float32, 0, NULL),
                 braid_invalid_argument, "NULL req", "braid_kv_push", "req is NULL");
    expect_error(braid_kv_push_pull(NULL, keys, lens, 1, out, out, braid_float32, 0, &req),
                 braid_invalid_argument, "NULL worker", "braid_kv_push_pull", "worker is NULL");
    expect_error(braid_kv_push(kv, keys, lens, 1, out, (braid_datatype_t)42, 0, &req),
                 braid_invalid_argument, "bad datatype", "braid_kv_push", "datatype 42");
    uint16_t halfs[4] = {0};
    uint64_t hkey = 20;
    size_t hlen = 4;
    expect_error(braid_kv_init(kv, &hkey, &hlen, 1, halfs, braid_float16),
                 braid_invalid_argument, "float16", "braid_kv_init", "float16");
    expect_error(braid_kv_wait(NULL, NULL), braid_invalid_argument, "NULL request",
                 "braid_kv_wait", "req is NULL");
    CHECK(braid_kv_request_free(NULL));

    /* The worker still works after the errors (a pull of the latest round, in place). */
    CHECK(braid_kv_pull(kv, keys, lens, NKEYS, out, braid_float32, -1, 0, &req));
    CHECK(braid_kv_wait(req, &v));
    CHECK(braid_kv_request_free(req));
    EXPECT(v == ROUNDS + 1, "final pull: version %llu", (unsigned long long)v);
    EXPECT(out[TOTAL - 1] == expect_f(cb, TOTAL - 1, ROUNDS + 1), "final pull value");

    CHECK(braid_kv_worker_destroy(kv));
    char path[4096];
    done_path(path, sizeof path, index);
    FILE* f = fopen(path, "w");
    EXPECT(f != NULL, "creating %s", path);
    fclose(f);
}

static void server(int cb) {
    braid_kv_server_t s = NULL;
    if (cb) {
        expect_error(braid_kv_server_start_with_update(&s, NULL, NULL, NULL),
                     braid_invalid_argument, "NULL update", "braid_kv_server_start_with_update",
                     "update is NULL");
        EXPECT(s == NULL, "no server after a failed start");
        CHECK(braid_kv_server_start_with_update(&s, NULL, add_twice, &calls));
    } else {
        CHECK(braid_kv_server_start(&s, NULL));
    }
    EXPECT(s != NULL, "a server");
    /* Serve until both workers are done. */
    int seen = 0;
    for (int t = 0; t < 6000 && seen < NWORKERS; t++) {
        seen = 0;
        for (int i = NSERVERS; i < NSERVERS + NWORKERS; i++) {
            char path[4096];
            done_path(path, sizeof path, i);
            FILE* f = fopen(path, "r");
            if (f) {
                seen++;
                fclose(f);
            }
        }
        if (seen < NWORKERS) sleep_ms(10);
    }
    EXPECT(seen == NWORKERS, "both workers done within 60 s (%d)", seen);
    /* Every part has a replica on the other server, so both servers ran the rule. */
    if (cb) EXPECT(atomic_load(&calls) > 0, "the update callback ran on this server");
    CHECK(braid_kv_server_destroy(s));
    CHECK(braid_kv_server_destroy(NULL));
}

int main(void) {
    const char* idx = getenv("BRAID_RUN_INDEX");
    EXPECT(idx != NULL, "BRAID_RUN_INDEX is set (run under braid-run)");
    int index = atoi(idx);
    const char* cbv = getenv("BRAID_KV_TEST_CALLBACK");
    int cb = cbv != NULL && strcmp(cbv, "1") == 0;
    if (index < NSERVERS) {
        server(cb);
    } else {
        worker(index, cb);
    }
    printf("kv ok (%s, %s)\n", index < NSERVERS ? "server" : "worker",
           cb ? "C update rule" : "sum");
    return 0;
}

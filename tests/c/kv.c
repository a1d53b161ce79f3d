/* Push/pull through the C ABI: 2 servers (BRAID_RUN_INDEX 0, 1) and 2 workers (2, 3) of one
 * group, run by capi/tests/c_programs.rs under `braid-run -n 4` with BRAID_GROUP set,
 * BRAID_PS_MODE=sync and a small BRAID_PS_PARTITION_BYTES (so the large key is split over
 * both servers).
 *
 * Workers: init 3 float keys of different lengths and one int64 key; rounds of push_pull with
 * exact expected values; a pull with min_version (non-blocking, completed by the next round);
 * braid_kv_push_pull_wait on a key of 1.2 MB (apart and in place); braid_kv_push_pull_waitv
 * of three keys in flight together (lent, apart, in place) and refused mid-call;
 * braid_kv_push_pull_nocopy of two keys in flight (lent and copied), then in place;
 * braid_kv_push_nocopy then a pull;
 * argument errors (wrong length for a known key names the key, wrong datatype, bad
 * min_version, NULL pointers); a float16 key summed in a sync round; braid_kv_set_rule at run
 * time (sgd with momentum: exact weights, braid_kv_pull_state / braid_kv_push_state of the
 * momentum; refused naming the field when malformed, and by servers with a C update rule).
 * Servers: braid_kv_server_workers sees both workers, then none once they left. Worker 2 also
 * checks braid_coordinator_status on a coordinator of its own (buffer too small: the length).
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

    /* braid_kv_push_pull_wait: a round waited for in the call on a key of 1.2 MB (sent from
     * `big` and received straight into `bigout`, no copies), then one in place (out == vals,
     * copied first), each with the exact sum (or the C rule's value). */
    {
        enum { BIG = 300000 };
        static float big[BIG], bigout[BIG];
        const uint64_t bkey = 30;
        const size_t blen = BIG;
        memset(big, 0, sizeof big);
        CHECK(braid_kv_init(kv, &bkey, &blen, 1, big, braid_float32));
        for (size_t i = 0; i < BIG; i++) big[i] = (float)(w + 1) * (float)(i % 7 + 1);
        v = 99;
        CHECK(braid_kv_push_pull_wait(kv, &bkey, &blen, 1, big, bigout, braid_float32, 0, &v));
        EXPECT(v == 1, "push_pull_wait: version %llu", (unsigned long long)v);
        for (size_t i = 0; i < BIG; i++) {
            float want = (cb ? 6.0f : 3.0f) * (float)(i % 7 + 1);
            EXPECT(bigout[i] == want, "push_pull_wait element %zu: %g, want %g", i,
                   (double)bigout[i], (double)want);
            EXPECT(big[i] == (float)(w + 1) * (float)(i % 7 + 1), "vals unchanged at %zu", i);
        }
        CHECK(braid_kv_push_pull_wait(kv, &bkey, &blen, 1, big, big, braid_float32, 0, NULL));
        for (size_t i = 0; i < BIG; i++) {
            float want = (cb ? 12.0f : 3.0f) * (float)(i % 7 + 1);
            EXPECT(big[i] == want, "in-place push_pull_wait element %zu: %g, want %g", i,
                   (double)big[i], (double)want);
        }
        expect_error(
            braid_kv_push_pull_wait(NULL, &bkey, &blen, 1, big, bigout, braid_float32, 0, &v),
            braid_invalid_argument, "NULL worker", "braid_kv_push_pull_wait", "worker is NULL");
        expect_error(
            braid_kv_push_pull_wait(kv, &bkey, &blen, 1, NULL, bigout, braid_float32, 0, &v),
            braid_invalid_argument, "NULL vals", "braid_kv_push_pull_wait", "vals is NULL");
    }

    /* braid_kv_push_pull_waitv: three keys in flight together, each with its own arrays: key
     * 31 (1.2 MB, sent from `b31` and received into `o31`, no copies), key 32 (5 floats, apart)
     * and key 33 (4 floats, in place); exact values. Then a call whose second key has a wrong
     * length: the first key was sent and waited for (its round's value in its output), the
     * error names the refused key. NULL arrays are refused before anything is sent. */
    {
        enum { B31 = 300000 };
        static float b31[B31], o31[B31];
        float b32[5], o32[5], b33[4];
        const uint64_t vk[3] = {31, 32, 33};
        const size_t vl[3] = {B31, 5, 4};
        memset(b31, 0, sizeof b31);
        memset(b32, 0, sizeof b32);
        memset(b33, 0, sizeof b33);
        for (int i = 0; i < 3; i++) {
            const float *zero = i == 0 ? b31 : i == 1 ? b32 : b33;
            CHECK(braid_kv_init(kv, &vk[i], &vl[i], 1, zero, braid_float32));
        }
        for (size_t i = 0; i < B31; i++) b31[i] = (float)(w + 1) * (float)(i % 5 + 1);
        for (size_t i = 0; i < 5; i++) b32[i] = (float)(w + 1) * (float)(i + 1);
        for (size_t i = 0; i < 4; i++) b33[i] = (float)(w + 1) * (float)(i + 2);
        const void *vv[3] = {b31, b32, b33};
        void *vo[3] = {o31, o32, b33};
        float f = cb ? 6.0f : 3.0f; /* 0 + 2*1 + 2*2 with the C rule; 1 + 2 summed */
        v = 99;
        CHECK(braid_kv_push_pull_waitv(kv, vk, vl, 3, vv, vo, braid_float32, 0, &v));
        EXPECT(v == 1, "push_pull_waitv: version %llu", (unsigned long long)v);
        for (size_t i = 0; i < B31; i++) {
            EXPECT(o31[i] == f * (float)(i % 5 + 1), "waitv key 31 element %zu: %g", i,
                   (double)o31[i]);
            EXPECT(b31[i] == (float)(w + 1) * (float)(i % 5 + 1), "waitv vals unchanged at %zu",
                   i);
        }
        for (size_t i = 0; i < 5; i++)
            EXPECT(o32[i] == f * (float)(i + 1), "waitv key 32 element %zu: %g", i,
                   (double)o32[i]);
        for (size_t i = 0; i < 4; i++)
            EXPECT(b33[i] == f * (float)(i + 2), "waitv key 33 (in place) element %zu: %g", i,
                   (double)b33[i]);
        /* keys 32 (sent), 33 (wrong length: refused), 31 (not sent) */
        const uint64_t rk[3] = {32, 33, 31};
        const size_t rl[3] = {5, 3, B31};
        const void *rv[3] = {b32, b33, b31};
        float o33[3];
        void *ro[3] = {o32, o33, o31};
        memset(o32, 0, sizeof o32);
        expect_error(braid_kv_push_pull_waitv(kv, rk, rl, 3, rv, ro, braid_float32, 0, &v),
                     braid_invalid_argument, "waitv wrong length", "braid_kv_push_pull_waitv",
                     "key 33");
        /* key 32's second round: 1 + 2 summed; 6 + 2*1 + 2*2 with the C rule */
        for (size_t i = 0; i < 5; i++)
            EXPECT(o32[i] == (cb ? 12.0f : 3.0f) * (float)(i + 1),
                   "waitv key 32 after the refusal, element %zu: %g", i, (double)o32[i]);
        expect_error(braid_kv_push_pull_waitv(kv, vk, vl, 3, NULL, vo, braid_float32, 0, &v),
                     braid_invalid_argument, "waitv NULL vals", "braid_kv_push_pull_waitv",
                     "vals is NULL");
        expect_error(braid_kv_push_pull_waitv(kv, vk, vl, 3, vv, NULL, braid_float32, 0, &v),
                     braid_invalid_argument, "waitv NULL outs", "braid_kv_push_pull_waitv",
                     "outs is NULL");
        /* keys sharing memory: refused before anything is sent (o32 stays zero) */
        memset(o32, 0, sizeof o32);
        void *shared_out[3] = {o31, o32, o31 + 10};
        expect_error(braid_kv_push_pull_waitv(kv, vk, vl, 3, vv, shared_out, braid_float32, 0,
                                              &v),
                     braid_invalid_argument, "waitv outputs overlap", "outs[2] overlaps outs[0]",
                     "its own");
        const void *shared_val[3] = {b31, o31 + 5, b33};
        expect_error(braid_kv_push_pull_waitv(kv, vk, vl, 3, shared_val, vo, braid_float32, 0,
                                              &v),
                     braid_invalid_argument, "waitv output over values",
                     "outs[0] overlaps vals[1]", "only its own");
        for (size_t i = 0; i < 5; i++)
            EXPECT(o32[i] == 0.0f, "refused waitv wrote key 32 element %zu", i);
    }

    /* braid_kv_push_pull_nocopy: two keys started without waiting, in flight together: key 34
     * (400 KB, sent from `b34` itself and received into `o34`) and key 35 (3 floats: copied,
     * as small values are); braid_kv_test until done for one, braid_kv_wait for the other;
     * exact values, `b34` untouched. Then key 35 in place (out == vals: copied first), and a
     * NULL req refused. */
    {
        enum { B34 = 100000 };
        static float b34[B34], o34[B34];
        float b35[3], o35[3];
        const uint64_t k34 = 34, k35 = 35;
        const size_t l34 = B34, l35 = 3;
        memset(b34, 0, sizeof b34);
        memset(b35, 0, sizeof b35);
        CHECK(braid_kv_init(kv, &k34, &l34, 1, b34, braid_float32));
        CHECK(braid_kv_init(kv, &k35, &l35, 1, b35, braid_float32));
        for (size_t i = 0; i < B34; i++) b34[i] = (float)(w + 1) * (float)(i % 7 + 1);
        for (size_t i = 0; i < 3; i++) b35[i] = (float)(w + 1) * (float)(i + 1);
        braid_kv_request_t r34 = NULL, r35 = NULL;
        CHECK(braid_kv_push_pull_nocopy(kv, &k34, &l34, 1, b34, o34, braid_float32, 0, &r34));
        CHECK(braid_kv_push_pull_nocopy(kv, &k35, &l35, 1, b35, o35, braid_float32, 0, &r35));
        EXPECT(r34 != NULL && r35 != NULL, "push_pull_nocopy requests");
        int d34 = 0;
        for (int i = 0; i < 6000 && d34 == 0; i++) {
            CHECK(braid_kv_test(r34, &d34));
            if (!d34) sleep_ms(5);
        }
        EXPECT(d34 == 1, "push_pull_nocopy of key 34 completes");
        uint64_t v34 = 0, v35 = 0;
        CHECK(braid_kv_wait(r34, &v34));
        CHECK(braid_kv_wait(r35, &v35));
        CHECK(braid_kv_request_free(r34));
        CHECK(braid_kv_request_free(r35));
        EXPECT(v34 == 1 && v35 == 1, "push_pull_nocopy versions %llu %llu",
               (unsigned long long)v34, (unsigned long long)v35);
        float f = cb ? 6.0f : 3.0f; /* 0 + 2*1 + 2*2 with the C rule; 1 + 2 summed */
        for (size_t i = 0; i < B34; i++) {
            EXPECT(o34[i] == f * (float)(i % 7 + 1), "nocopy key 34 element %zu: %g", i,
                   (double)o34[i]);
            EXPECT(b34[i] == (float)(w + 1) * (float)(i % 7 + 1),
                   "nocopy vals unchanged at %zu", i);
        }
        for (size_t i = 0; i < 3; i++)
            EXPECT(o35[i] == f * (float)(i + 1), "nocopy key 35 element %zu: %g", i,
                   (double)o35[i]);
        CHECK(braid_kv_push_pull_nocopy(kv, &k35, &l35, 1, b35, b35, braid_float32, 0, &r35));
        CHECK(braid_kv_wait(r35, &v35));
        CHECK(braid_kv_request_free(r35));
        /* round 2: 1 + 2 summed; 6 + 2*1 + 2*2 with the C rule */
        for (size_t i = 0; i < 3; i++)
            EXPECT(b35[i] == (cb ? 12.0f : 3.0f) * (float)(i + 1),
                   "nocopy key 35 in place, element %zu: %g", i, (double)b35[i]);
        expect_error(
            braid_kv_push_pull_nocopy(kv, &k35, &l35, 1, b35, o35, braid_float32, 0, NULL),
            braid_invalid_argument, "nocopy NULL req", "braid_kv_push_pull_nocopy",
            "req is NULL");
        /* braid_kv_push_nocopy of key 34 (sent from `b34`), then a pull of its round */
        CHECK(braid_kv_push_nocopy(kv, &k34, &l34, 1, b34, braid_float32, 0, &r34));
        CHECK(braid_kv_wait(r34, NULL));
        CHECK(braid_kv_request_free(r34));
        CHECK(braid_kv_pull(kv, &k34, &l34, 1, o34, braid_float32, -1, 0, &r34));
        CHECK(braid_kv_wait(r34, &v34));
        CHECK(braid_kv_request_free(r34));
        EXPECT(v34 == 2, "push_nocopy then pull: version %llu", (unsigned long long)v34);
        for (size_t i = 0; i < B34; i++)
            EXPECT(o34[i] == (cb ? 12.0f : 3.0f) * (float)(i % 7 + 1),
                   "push_nocopy key 34 element %zu: %g", i, (double)o34[i]);
        expect_error(braid_kv_push_nocopy(kv, &k34, &l34, 1, b34, braid_float32, 0, NULL),
                     braid_invalid_argument, "push_nocopy NULL req", "braid_kv_push_nocopy",
                     "req is NULL");
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
    expect_error(braid_kv_wait(NULL, NULL), braid_invalid_argument, "NULL request",
                 "braid_kv_wait", "req is NULL");
    CHECK(braid_kv_request_free(NULL));

    /* The worker still works after the errors (a pull of the latest round, in place). */
    CHECK(braid_kv_pull(kv, keys, lens, NKEYS, out, braid_float32, -1, 0, &req));
    CHECK(braid_kv_wait(req, &v));
    CHECK(braid_kv_request_free(req));
    EXPECT(v == ROUNDS + 1, "final pull: version %llu", (unsigned long long)v);
    EXPECT(out[TOTAL - 1] == expect_f(cb, TOTAL - 1, ROUNDS + 1), "final pull value");

    /* float16: a sync round sums the workers' pushes (bit patterns; exact values). Worker w
     * pushes (w + 1) * {0.5, 0.25, 1, 2}. With the C rule, which refuses float16, the round
     * closes with the value unchanged. */
    uint64_t hkey = 20;
    size_t hlen = 4;
    const uint16_t hinit[4] = {0x3C00, 0x4000, 0x3800, 0xBC00}; /* 1, 2, 0.5, -1 */
    const uint16_t hgrad[2][4] = {{0x3800, 0x3400, 0x3C00, 0x4000},  /* 0.5 0.25 1 2 */
                                  {0x3C00, 0x3800, 0x4000, 0x4400}}; /* 1 0.5 2 4 */
    const uint16_t hsum[4] = {0x3E00, 0x3A00, 0x4200, 0x4600};       /* 1.5 0.75 3 6 */
    uint16_t hout[4] = {0};
    CHECK(braid_kv_init(kv, &hkey, &hlen, 1, hinit, braid_float16));
    CHECK(braid_kv_push_pull(kv, &hkey, &hlen, 1, hgrad[w], hout, braid_float16, 0, &req));
    CHECK(braid_kv_wait(req, &v));
    CHECK(braid_kv_request_free(req));
    EXPECT(v == 1, "float16 round: version %llu", (unsigned long long)v);
    for (int i = 0; i < 4; i++) {
        uint16_t want = cb ? hinit[i] : hsum[i];
        EXPECT(hout[i] == want, "float16 element %d: 0x%04x, want 0x%04x", i, hout[i], want);
    }

    /* A rule installed at run time. */
    expect_error(braid_kv_set_rule(kv, "sgd:lr=x"), braid_invalid_argument, "malformed rule",
                 "braid_kv_set_rule", "lr=x");
    expect_error(braid_kv_set_rule(kv, "sgd:lr=0.5,nesterov=1"), braid_invalid_argument,
                 "unknown field", "braid_kv_set_rule", "nesterov");
    expect_error(braid_kv_set_rule(kv, NULL), braid_invalid_argument, "NULL rule",
                 "braid_kv_set_rule", "rule is NULL");
    if (cb) {
        expect_error(braid_kv_set_rule(kv, "sgd:lr=0.5,momentum=0.5"), braid_invalid_argument,
                     "callback servers refuse", "braid_kv_set_rule", "custom");
    } else {
        /* sgd with momentum 0.5, lr 0.5 on this round's sum G = 3 * (i + r): mom = -0.5 G,
         * w = w_prev - 0.5 G (exact in float32). */
        CHECK(braid_kv_set_rule(kv, "sgd:lr=0.5,momentum=0.5"));
        CHECK(braid_kv_set_rule(kv, "sgd:lr=0.5,momentum=0.5")); /* idempotent */
        int r = ROUNDS + 2;
        static float g[TOTAL], mom[TOTAL];
        for (size_t i = 0; i < TOTAL; i++) g[i] = (float)(w + 1) * (float)(i + (size_t)r);
        CHECK(braid_kv_push_pull(kv, keys, lens, NKEYS, g, out, braid_float32, 0, &req));
        CHECK(braid_kv_wait(req, &v));
        CHECK(braid_kv_request_free(req));
        EXPECT(v == (uint64_t)r, "sgd round: version %llu", (unsigned long long)v);
        CHECK(braid_kv_pull_state(kv, keys, lens, NKEYS, mom, braid_float32));
        for (size_t i = 0; i < TOTAL; i++) {
            float G = 3.0f * (float)(i + (size_t)r);
            float want = expect_f(0, i, ROUNDS + 1) - 0.5f * G;
            EXPECT(out[i] == want, "sgd element %zu: %g, want %g", i, (double)out[i],
                   (double)want);
            EXPECT(mom[i] == -0.5f * G, "momentum element %zu: %g, want %g", i, (double)mom[i],
                   (double)(-0.5f * G));
        }
        /* An integer key has no sgd: its state reads as zeros; a key nobody created fails. */
        int64_t istate[NINT] = {7, 7, 7};
        CHECK(braid_kv_pull_state(kv, &ikey, &ilen, 1, istate, braid_int64));
        for (size_t j = 0; j < NINT; j++) EXPECT(istate[j] == 0, "int state %zu", j);
        uint64_t nokey = 999;
        size_t nolen = 2;
        float two[2];
        expect_error(braid_kv_pull_state(kv, &nokey, &nolen, 1, two, braid_float32),
                     braid_invalid_argument, "unknown key", "braid_kv_pull_state", "999");
        expect_error(braid_kv_push_state(kv, keys, &five_len, 1, five, braid_float32),
                     braid_invalid_argument, "state of a wrong length", "braid_kv_push_state",
                     "key 1");
        /* Worker 0 replaces the momentum (after both read it: a round in between). */
        CHECK(braid_kv_push_pull(kv, &hkey, &hlen, 1, hgrad[w], hout, braid_float16, 0, &req));
        CHECK(braid_kv_wait(req, &v));
        CHECK(braid_kv_request_free(req));
        if (w == 0) {
            for (size_t i = 0; i < TOTAL; i++) mom[i] = 1.0f;
            CHECK(braid_kv_push_state(kv, keys, lens, NKEYS, mom, braid_float32));
        }
        /* Another round on the float16 key orders the replacement before both reads. */
        CHECK(braid_kv_push_pull(kv, &hkey, &hlen, 1, hgrad[w], hout, braid_float16, 0, &req));
        CHECK(braid_kv_wait(req, &v));
        CHECK(braid_kv_request_free(req));
        memset(mom, 0, sizeof mom);
        CHECK(braid_kv_pull_state(kv, keys, lens, NKEYS, mom, braid_float32));
        for (size_t i = 0; i < TOTAL; i++) EXPECT(mom[i] == 1.0f, "replaced momentum %zu", i);
    }

    if (w == 0) {
        /* The status of a coordinator of this process (nobody registered). */
        braid_coordinator_t c = NULL;
        CHECK(braid_coordinator_start("127.0.0.1:0", NULL, &c));
        char small[8] = "unused";
        size_t len = 0;
        expect_error(braid_coordinator_status(c, small, sizeof small, &len),
                     braid_invalid_argument, "small buffer", "braid_coordinator_status",
                     "too small");
        EXPECT(len > sizeof small && strcmp(small, "unused") == 0,
               "len %zu and the buffer untouched", len);
        char* doc = malloc(len + 1);
        EXPECT(doc != NULL, "malloc");
        size_t len2 = 0;
        CHECK(braid_coordinator_status(c, doc, len + 1, &len2));
        EXPECT(len2 == len && strlen(doc) == len, "status of %zu bytes", len2);
        EXPECT(strstr(doc, "\"live_members\":0") != NULL, "live_members: %s", doc);
        EXPECT(strstr(doc, "\"registered_total\":0") != NULL, "registered_total: %s", doc);
        free(doc);
        expect_error(braid_coordinator_status(NULL, small, sizeof small, &len),
                     braid_invalid_argument, "NULL coord", "braid_coordinator_status", "coord");
        CHECK(braid_coordinator_destroy(c));
    }

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
    size_t nw = 99;
    CHECK(braid_kv_server_workers(s, &nw));
    EXPECT(nw == NWORKERS, "the server sees %zu workers, want %d", nw, NWORKERS);
    expect_error(braid_kv_server_workers(s, NULL), braid_invalid_argument, "NULL workers",
                 "braid_kv_server_workers", "workers is NULL");
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
    /* They left the group: the server's view loses them (as a dedicated server process polls
     * it to know when to stop). */
    for (int t = 0; t < 3000 && nw != 0; t++) {
        CHECK(braid_kv_server_workers(s, &nw));
        if (nw != 0) sleep_ms(10);
    }
    EXPECT(nw == 0, "no worker left in the server's view within 30 s (%zu)", nw);
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

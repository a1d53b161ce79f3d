#define _POSIX_C_SOURCE 200809L
/* Pipeline planning through the C ABI: closed-form plans over explicit member lists, re-plans
 * that move the fewest blocks, argument errors with messages, and plans over the
 * communicator's view that agree on every rank. Run under braid-run on 1-4 ranks. Not
 * elastic: braid_pipeline_report is refused with braid_invalid_usage. With BRAID_ELASTIC=1 on
 * 2+ ranks: every rank reports its stage time each step, rank 1 four times slower, until the
 * coordinator publishes a re-weigh view; then rank 1 has the lowest weight and a re-plan over
 * the view gives it fewer blocks. */
#include <stdint.h>
#include <time.h>

#include "common.h"

#define EXPECT_STATUS(call, want, needle)                                                    \
    do {                                                                                     \
        braid_status_t st_ = (call);                                                         \
        const char* msg_ = braid_get_last_error();                                           \
        EXPECT(st_ == (want), "%s: got %s (%s)", #call, braid_status_string(st_), msg_);     \
        EXPECT(msg_ != NULL && strstr(msg_, (needle)) != NULL, "%s: message '%s' lacks '%s'", \
               #call, msg_, (needle));                                                       \
    } while (0)

#define NONE BRAID_PIPELINE_NONE
#define MAXM 16

/* Stages are contiguous, cover [0, n_blocks), and prev/next link the non-empty stages. */
static void check_shape(const braid_pipeline_stage_t* s, size_t n, uint64_t n_blocks) {
    uint64_t at = 0, last = NONE;
    for (size_t i = 0; i < n; i++) {
        EXPECT(s[i].first_block == at, "stage %zu starts at %llu, not %llu", i,
               (unsigned long long)s[i].first_block, (unsigned long long)at);
        EXPECT(s[i].end_block >= s[i].first_block, "stage %zu is a range", i);
        at = s[i].end_block;
        if (s[i].end_block > s[i].first_block) {
            EXPECT(s[i].prev == last, "stage %zu prev %llu, want %llu", i,
                   (unsigned long long)s[i].prev, (unsigned long long)last);
            if (last != NONE) {
                for (size_t j = 0; j < i; j++) {
                    if (s[j].member == last) {
                        EXPECT(s[j].next == s[i].member, "stage %zu next", j);
                    }
                }
            }
            last = s[i].member;
        } else {
            EXPECT(s[i].prev == NONE && s[i].next == NONE, "empty stage %zu has neighbours", i);
        }
    }
    EXPECT(at == n_blocks, "stages cover %llu of %llu blocks", (unsigned long long)at,
           (unsigned long long)n_blocks);
    for (size_t i = n; i-- > 0;) {
        if (s[i].end_block > s[i].first_block) {
            EXPECT(s[i].next == NONE, "the last non-empty stage %zu has no next", i);
            break;
        }
    }
}

static uint64_t owner(const braid_pipeline_stage_t* s, size_t n, uint64_t block) {
    for (size_t i = 0; i < n; i++) {
        if (s[i].first_block <= block && block < s[i].end_block) return s[i].member;
    }
    return NONE;
}

static void explicit_plans(void) {
    double ones[12] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    braid_pipeline_stage_t st[MAXM], prev[MAXM];
    braid_pipeline_move_t mv[12];
    double maxc = -1;
    size_t nmv = 99;

    /* 10 equal blocks over 4 equal members: the largest stage has 3 blocks, each has 1..3. */
    uint64_t m4[4] = {11, 12, 13, 14};
    double w4[4] = {1, 1, 1, 1};
    CHECK(braid_pipeline_plan(m4, w4, 4, ones, 10, st, &maxc));
    EXPECT(maxc == 3.0, "max_cost %g", maxc);
    check_shape(st, 4, 10);
    for (int i = 0; i < 4; i++) {
        uint64_t len = st[i].end_block - st[i].first_block;
        EXPECT(st[i].member == m4[i] && len >= 1 && len <= 3, "stage %d: member %llu, %llu blocks",
               i, (unsigned long long)st[i].member, (unsigned long long)len);
    }
    EXPECT(st[0].prev == NONE && st[0].next == 12 && st[3].prev == 13 && st[3].next == NONE,
           "neighbours");

    /* Weights: member 2 twice as fast -> 3|6|3, unique. */
    uint64_t m3[3] = {1, 2, 3};
    double w3[3] = {1, 2, 1};
    CHECK(braid_pipeline_plan(m3, w3, 3, ones, 12, st, &maxc));
    EXPECT(maxc == 3.0, "max_cost %g", maxc);
    EXPECT(st[0].end_block == 3 && st[1].end_block == 9 && st[2].end_block == 12, "3|6|3");
    check_shape(st, 3, 12);

    /* Uneven costs: a heavy first block stands alone. */
    double uneven[6] = {5, 1, 1, 1, 1, 1};
    uint64_t m2[2] = {7, 8};
    double w2[2] = {1, 1};
    CHECK(braid_pipeline_plan(m2, w2, 2, uneven, 6, st, &maxc));
    EXPECT(maxc == 5.0 && st[0].end_block == 1, "heavy block: max %g end %llu", maxc,
           (unsigned long long)st[0].end_block);

    /* Fewer blocks than members: two stages stay empty and the others link past them. */
    CHECK(braid_pipeline_plan(m4, w4, 4, ones, 2, st, &maxc));
    EXPECT(maxc == 1.0, "max_cost %g", maxc);
    check_shape(st, 4, 2);

    /* Zero blocks: every stage empty. */
    CHECK(braid_pipeline_plan(m4, w4, 4, NULL, 0, st, &maxc));
    EXPECT(maxc == 0.0, "max_cost %g", maxc);
    check_shape(st, 4, 0);

    /* Re-plan: 12 blocks 4|4|4, then member 9 joins last -> 3|3|3|3 moving exactly 6 blocks
     * (3: 1->2, 6,7: 2->3, 9,10,11: 3->9). */
    uint64_t w3ones_ids[3] = {1, 2, 3};
    double w3ones[3] = {1, 1, 1};
    CHECK(braid_pipeline_plan(w3ones_ids, w3ones, 3, ones, 12, prev, &maxc));
    EXPECT(prev[0].end_block == 4 && prev[1].end_block == 8, "4|4|4");
    uint64_t j4[4] = {1, 2, 3, 9};
    CHECK(braid_pipeline_replan(j4, w4, 4, ones, 12, prev, 3, st, &maxc, mv, 12, &nmv));
    EXPECT(maxc == 3.0, "max_cost %g", maxc);
    check_shape(st, 4, 12);
    for (int i = 0; i < 4; i++) EXPECT(st[i].end_block - st[i].first_block == 3, "3|3|3|3");
    EXPECT(nmv == 6, "%zu moves", nmv);
    uint64_t want[6][3] = {{3, 1, 2}, {6, 2, 3}, {7, 2, 3}, {9, 3, 9}, {10, 3, 9}, {11, 3, 9}};
    for (size_t k = 0; k < nmv; k++) {
        EXPECT(mv[k].block == want[k][0] && mv[k].from == want[k][1] && mv[k].to == want[k][2],
               "move %zu: block %llu %llu->%llu", k, (unsigned long long)mv[k].block,
               (unsigned long long)mv[k].from, (unsigned long long)mv[k].to);
        EXPECT(owner(prev, 3, mv[k].block) == mv[k].from, "from is the old owner");
        EXPECT(owner(st, 4, mv[k].block) == mv[k].to, "to is the new owner");
    }
    /* Too few move slots: refused, *n_moves says how many are needed. */
    nmv = 0;
    EXPECT_STATUS(braid_pipeline_replan(j4, w4, 4, ones, 12, prev, 3, st, &maxc, mv, 2, &nmv),
                  braid_invalid_argument, "moves_capacity");
    EXPECT(nmv == 6, "n_moves %zu after a short capacity", nmv);
    /* Same members again: nothing moves, the plan is the previous one. */
    CHECK(braid_pipeline_replan(w3ones_ids, w3ones, 3, ones, 12, prev, 3, st, &maxc, mv, 12, &nmv));
    EXPECT(nmv == 0, "%zu moves for an unchanged view", nmv);
    for (int i = 0; i < 3; i++) {
        EXPECT(st[i].first_block == prev[i].first_block && st[i].end_block == prev[i].end_block,
               "unchanged stage %d", i);
    }
    /* A member leaves (2): its blocks move, the others keep theirs where the optimum allows. */
    uint64_t l2[2] = {1, 3};
    CHECK(braid_pipeline_replan(l2, w2, 2, ones, 12, prev, 3, st, &maxc, mv, 12, &nmv));
    EXPECT(maxc == 6.0 && nmv == 4, "leave: max %g, %zu moves", maxc, nmv);
    for (size_t k = 0; k < nmv; k++) EXPECT(mv[k].from == 2, "only member 2's blocks move");
    /* No previous stages: nothing counts as a move. */
    CHECK(braid_pipeline_replan(j4, w4, 4, ones, 12, NULL, 0, st, &maxc, NULL, 0, &nmv));
    EXPECT(nmv == 0, "%zu moves without a previous plan", nmv);
}

static void argument_errors(void) {
    double ones[4] = {1, 1, 1, 1}, maxc;
    uint64_t ids[2] = {1, 2};
    double w[2] = {1, 1};
    braid_pipeline_stage_t st[4];
    braid_pipeline_move_t mv[4];
    size_t n;
    EXPECT_STATUS(braid_pipeline_plan(ids, w, 0, ones, 4, st, &maxc), braid_invalid_argument,
                  "at least one member");
    EXPECT_STATUS(braid_pipeline_plan(NULL, w, 2, ones, 4, st, &maxc), braid_invalid_argument,
                  "members is NULL");
    EXPECT_STATUS(braid_pipeline_plan(ids, w, 2, NULL, 4, st, &maxc), braid_invalid_argument,
                  "costs is NULL");
    EXPECT_STATUS(braid_pipeline_plan(ids, w, 2, ones, 4, NULL, &maxc), braid_invalid_argument,
                  "stages is NULL");
    EXPECT_STATUS(braid_pipeline_plan(ids, w, 2, ones, 4, st, NULL), braid_invalid_argument,
                  "max_cost is NULL");
    uint64_t twice[2] = {5, 5};
    EXPECT_STATUS(braid_pipeline_plan(twice, w, 2, ones, 4, st, &maxc), braid_invalid_argument,
                  "twice");
    uint64_t none[2] = {1, BRAID_PIPELINE_NONE};
    EXPECT_STATUS(braid_pipeline_plan(none, w, 2, ones, 4, st, &maxc), braid_invalid_argument,
                  "reserved");
    double zero_w[2] = {1, 0};
    EXPECT_STATUS(braid_pipeline_plan(ids, zero_w, 2, ones, 4, st, &maxc),
                  braid_invalid_argument, "weight");
    double bad_cost[4] = {1, -1, 1, 1};
    EXPECT_STATUS(braid_pipeline_plan(ids, w, 2, bad_cost, 4, st, &maxc), braid_invalid_argument,
                  "cost");
    braid_pipeline_stage_t overlap[2] = {{1, 0, 3, NONE, 2}, {2, 2, 4, 1, NONE}};
    EXPECT_STATUS(braid_pipeline_replan(ids, w, 2, ones, 4, overlap, 2, st, &maxc, mv, 4, &n),
                  braid_invalid_argument, "both hold block 2");
    braid_pipeline_stage_t outside[1] = {{1, 0, 9, NONE, NONE}};
    EXPECT_STATUS(braid_pipeline_replan(ids, w, 2, ones, 4, outside, 1, st, &maxc, mv, 4, &n),
                  braid_invalid_argument, "within the 4 blocks");
    EXPECT_STATUS(braid_pipeline_replan(ids, w, 2, ones, 4, NULL, 1, st, &maxc, mv, 4, &n),
                  braid_invalid_argument, "previous is NULL");
    EXPECT_STATUS(braid_pipeline_replan(ids, w, 2, ones, 4, NULL, 0, st, &maxc, mv, 4, NULL),
                  braid_invalid_argument, "n_moves is NULL");
    EXPECT_STATUS(braid_pipeline_plan_view(NULL, ones, 4, st, &maxc), braid_invalid_argument,
                  "comm is NULL");
    EXPECT_STATUS(braid_comm_view_members(NULL, ids, w, 2, &n), braid_invalid_argument,
                  "comm is NULL");
}

static void view_plans(braid_comm_t comm, int rank, int size) {
    uint64_t ids[MAXM], me;
    double w[MAXM], maxc, maxc2;
    size_t n = 0;
    CHECK(braid_comm_member_id(comm, &me));
    /* Too small a capacity: refused, *count is the view size. */
    EXPECT_STATUS(braid_comm_view_members(comm, NULL, NULL, 0, &n), braid_invalid_argument,
                  "capacity 0");
    EXPECT(n == (size_t)size, "count %zu on %d ranks", n, size);
    EXPECT_STATUS(braid_comm_view_members(comm, ids, w, MAXM, NULL), braid_invalid_argument,
                  "count is NULL");
    CHECK(braid_comm_view_members(comm, ids, w, MAXM, &n));
    EXPECT(n == (size_t)size && ids[rank] == me, "my id %llu at rank %d",
           (unsigned long long)me, rank);
    for (size_t i = 0; i < n; i++) EXPECT(w[i] == 1.0, "default weight %g", w[i]);

    double costs[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    braid_pipeline_stage_t st[MAXM], st2[MAXM], root[MAXM];
    braid_pipeline_move_t mv[10];
    CHECK(braid_pipeline_plan_view(comm, costs, 10, st, &maxc));
    check_shape(st, n, 10);
    EXPECT(st[rank].member == me, "my stage is mine");
    /* The same as planning over the view's list explicitly. */
    CHECK(braid_pipeline_plan(ids, w, n, costs, 10, st2, &maxc2));
    EXPECT(maxc == maxc2 && memcmp(st, st2, n * sizeof st[0]) == 0, "view plan = list plan");
    /* Every rank computes the same plan. */
    memcpy(root, st, sizeof root);
    CHECK(braid_broadcast(root, root, n * 5, braid_uint64, 0, comm));
    EXPECT(memcmp(root, st, n * sizeof st[0]) == 0, "rank %d's plan differs from rank 0's", rank);
    /* A re-plan over the same view moves nothing. */
    size_t nmv = 99;
    CHECK(braid_pipeline_replan_view(comm, costs, 10, st, n, st2, &maxc2, mv, 10, &nmv));
    EXPECT(nmv == 0 && maxc2 == maxc && memcmp(st, st2, n * sizeof st[0]) == 0,
           "replan_view of an unchanged view: %zu moves", nmv);
    /* From a plan where one member held everything: every other block moves to the view. */
    braid_pipeline_stage_t all[1] = {{me, 0, 10, NONE, NONE}};
    CHECK(braid_pipeline_replan_view(comm, costs, 10, all, 1, st2, &maxc2, mv, 10, &nmv));
    size_t mine = (size_t)(st2[rank].end_block - st2[rank].first_block);
    EXPECT(nmv == 10 - mine, "%zu moves, %zu blocks stay", nmv, mine);
    for (size_t k = 0; k < nmv; k++) {
        EXPECT(mv[k].from == me && mv[k].to != me && owner(st2, n, mv[k].block) == mv[k].to,
               "move %zu", k);
    }
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void reports(braid_comm_t comm, int rank, int size) {
    double costs[12] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    const char* el = getenv("BRAID_ELASTIC");
    int elastic = el != NULL && strcmp(el, "1") == 0;
    EXPECT_STATUS(braid_pipeline_report(NULL, 1.0, 0, 1, costs, 12), braid_invalid_argument,
                  "comm is NULL");
    if (!elastic) {
        EXPECT_STATUS(braid_pipeline_report(comm, 1.0, 0, 1, costs, 12), braid_invalid_usage,
                      "elastic");
        return;
    }
    EXPECT_STATUS(braid_pipeline_report(comm, -1.0, 0, 1, costs, 12), braid_invalid_argument,
                  "seconds");
    EXPECT_STATUS(braid_pipeline_report(comm, 1.0, 0, 13, costs, 12), braid_invalid_argument,
                  "within");
    EXPECT_STATUS(braid_pipeline_report(comm, 1.0, 0, 1, NULL, 12), braid_invalid_argument,
                  "costs is NULL");
    double neg[2] = {1, -2};
    EXPECT_STATUS(braid_pipeline_report(comm, 1.0, 0, 1, neg, 2), braid_invalid_argument, "cost");
    CHECK(braid_pipeline_report(comm, 0.0, 0, 0, costs, 12)); /* accepted, ignored */
    if (size < 2) return;

    braid_pipeline_stage_t plan[MAXM], next[MAXM];
    braid_pipeline_move_t mv[12];
    double maxc, maxc2;
    size_t nmv = 0, n = 0;
    uint64_t me, ids[MAXM], epoch0, epoch;
    double w[MAXM];
    CHECK(braid_comm_member_id(comm, &me));
    CHECK(braid_comm_epoch(comm, &epoch0));
    CHECK(braid_pipeline_plan_view(comm, costs, 12, plan, &maxc));
    uint64_t first = plan[rank].first_block, end = plan[rank].end_block;
    double speed = rank == 1 ? 250.0 : 1000.0; /* blocks per second */
    int changed = 0;
    for (int step = 0; step < 1500 && !changed; step++) {
        CHECK(braid_pipeline_report(comm, (double)(end - first) / speed, first, end, costs, 12));
        sleep_ms(20);
        CHECK(braid_comm_update(comm, &changed));
    }
    EXPECT(changed, "no re-weigh view within 30 s");
    CHECK(braid_comm_epoch(comm, &epoch));
    EXPECT(epoch == epoch0 + 1, "epoch %llu after %llu", (unsigned long long)epoch,
           (unsigned long long)epoch0);
    CHECK(braid_comm_view_members(comm, ids, w, MAXM, &n));
    EXPECT(n == (size_t)size, "same members: %zu", n);
    double sum = 0;
    for (size_t i = 0; i < n; i++) {
        EXPECT(ids[i] == plan[i].member, "same order");
        sum += w[i];
        if (i != 1) EXPECT(w[1] < w[i] / 2, "slow weight %g vs %g", w[1], w[i]);
    }
    EXPECT(sum > size - 1e-9 && sum < size + 1e-9, "mean weight kept: sum %g", sum);
    CHECK(braid_pipeline_replan_view(comm, costs, 12, plan, n, next, &maxc2, mv, 12, &nmv));
    EXPECT(next[1].end_block - next[1].first_block < plan[1].end_block - plan[1].first_block,
           "the slow stage loses blocks: %llu..%llu -> %llu..%llu",
           (unsigned long long)plan[1].first_block, (unsigned long long)plan[1].end_block,
           (unsigned long long)next[1].first_block, (unsigned long long)next[1].end_block);
    EXPECT(nmv > 0, "blocks move");
    printf("pipeline reweigh ok (rank %d: weights", rank);
    for (size_t i = 0; i < n; i++) printf(" %.3f", w[i]);
    printf(")\n");
}

int main(void) {
    explicit_plans();
    argument_errors();
    int rank, size;
    braid_comm_t comm = test_comm(&rank, &size);
    EXPECT(size <= MAXM, "size %d", size);
    view_plans(comm, rank, size);
    reports(comm, rank, size);
    CHECK(braid_barrier(comm));
    printf("pipeline ok (rank %d of %d)\n", rank, size);
    CHECK(braid_comm_destroy(comm));
    return 0;
}

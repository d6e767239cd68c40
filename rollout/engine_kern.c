/* Matrix products of the engine over the packed rows of qtypes.h, on the calling thread or as
 * one parallel region of the pool.
 *
 * Every product goes through the kernels of rollout/kernels.h: TERNARY weights with int8
 * activations (matmul_q), every other type with FP32 activations (matmul_f). INT4 (experts)
 * and INT8 (micro agents, head_int8) rows are dequantised inside the kernel to exactly
 * scale * code, the learner's fake-quantized value, so the only difference from the learner
 * is the summation order; the kernels' INT4 x int8 / INT8 x int8 products would add an
 * activation rounding the learner does not simulate (docs/ENGINE.md).
 *
 * Parallel regions: the rows of each product are cut into chunks whose size depends only on
 * the product's shape and n (never on the thread count) and handed out dynamically
 * (kern_pool_for). A kernel's output element does not depend on where its row range starts,
 * so results are the same for every thread count and every chunking. */
#include "engine.h"

#include <string.h>
#include <time.h>

/* Row boundaries of chunks: whole kernel row tiles. */
#define ENG_SPLIT_ALIGN 8
/* Weight bytes per chunk at n <= 8 activation rows (halved for each further 8 rows): a few
 * microseconds of work, so a chunk held by a descheduled thread delays the others little and
 * ~100 chunks of the head keep two threads balanced. */
#define ENG_CHUNK_BYTES (128 * 1024)
/* Chunks a product is cut into at least (rows permitting). */
#define ENG_MIN_CHUNKS 4
/* Products of one region at most. */
#define ENG_REGION_MAX 96

double eng_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void eng_clock_start(eng_clock_t *c, const kern_pool_t *pool) {
    c->pool = pool;
    c->wall = eng_now();
    kern_pool_region_time(pool, &c->region, &c->model);
}

void eng_clock_lap(eng_clock_t *c, double *wall_s, eng_time_stats_t *ts, eng_stage_t stage) {
    const double w = eng_now();
    double reg, mod;
    kern_pool_region_time(c->pool, &reg, &mod);
    *wall_s += w - c->wall;
    ts->wall_s[stage] += w - c->wall;
    ts->region_s[stage] += reg - c->region;
    ts->model_s[stage] += mod - c->model;
    c->wall = w;
    c->region = reg;
    c->model = mod;
}

void eng_row_dequant(const eng_mat_t *W, size_t r, float *out) {
    Q_ASSERT(r < W->rows);
    qtype_traits(W->qt)->dequantize_row_ref(W->w + r * W->row_bytes, out, W->cols);
}

float eng_row_dot(const kern_ops_t *ops, const eng_mat_t *W, size_t r, const float *x) {
    Q_ASSERT(r < W->rows && W->qt != QTYPE_TERNARY && W->cols <= KERN_MAX_IN);
    float y;
    ops->matmul_f[W->qt](W->w + r * W->row_bytes, W->cols, x, W->cols, 1, &y, 1, 0, 1);
    return y;
}

void eng_matmul_rows(const kern_ops_t *ops, const eng_prod_t *pr, size_t r0, size_t r1) {
    const eng_mat_t *W = pr->W;
    Q_ASSERT(r0 <= r1 && r1 <= W->rows && W->cols <= KERN_MAX_IN);
    if (r0 == r1 || pr->n == 0)
        return;
    if (W->qt == QTYPE_TERNARY) {
        Q_ASSERT(pr->act && pr->act->n == pr->n && pr->act->in == W->cols);
        const kern_matmul_q_fn ilv = ops->matmul_ilv[QTYPE_TERNARY];
        if (W->wx && ilv && r0 % kern_ilv(QTYPE_TERNARY)->rows == 0)
            ilv(W->wx, W->cols, pr->act, pr->y, pr->ldy, r0, r1);
        else
            ops->matmul_q[QTYPE_TERNARY](W->w, W->cols, pr->act, pr->y, pr->ldy, r0, r1);
    } else {
        Q_ASSERT(pr->x && pr->ldx >= W->cols);
        ops->matmul_f[W->qt](W->w, W->cols, pr->x, pr->ldx, pr->n, pr->y, pr->ldy, r0, r1);
    }
}

/* Rows per chunk of a product of W with n activation rows: about ENG_CHUNK_BYTES of weights
 * (less for larger n), and at least ENG_MIN_CHUNKS chunks where the rows allow, so a small
 * product still gives every thread a share. */
static size_t chunk_rows(const eng_mat_t *W, size_t n) {
    const size_t per = W->row_bytes * ((n + 7) / 8);
    size_t r = ENG_CHUNK_BYTES / (per ? per : 1);
    const size_t quarter = (W->rows + ENG_MIN_CHUNKS - 1) / ENG_MIN_CHUNKS;
    r = r < quarter ? r : quarter;
    r = r / ENG_SPLIT_ALIGN * ENG_SPLIT_ALIGN;
    return r < ENG_SPLIT_ALIGN ? ENG_SPLIT_ALIGN : r;
}

size_t eng_prod_nchunks(const eng_prod_t *pr) {
    if (pr->n == 0)
        return 0;
    const size_t cr = chunk_rows(pr->W, pr->n);
    return (pr->W->rows + cr - 1) / cr;
}

void eng_prod_chunk(const kern_ops_t *ops, const eng_prod_t *pr, size_t c) {
    const size_t cr = chunk_rows(pr->W, pr->n), r0 = c * cr, rows = pr->W->rows;
    Q_ASSERT(r0 < rows);
    eng_matmul_rows(ops, pr, r0, r0 + cr < rows ? r0 + cr : rows);
}

typedef struct {
    const kern_ops_t *ops;
    const eng_prod_t *prods;
    size_t first[ENG_REGION_MAX + 1]; /* first chunk of each product */
} region_t;

static void region_chunk(void *vctx, size_t c, int tid) {
    const region_t *g = vctx;
    (void)tid;
    int i = 0;
    while (c >= g->first[i + 1])
        i++;
    eng_prod_chunk(g->ops, &g->prods[i], c - g->first[i]);
}

void eng_matmul_many(kern_pool_t *pool, const kern_ops_t *ops, const eng_prod_t *prods, int nprod) {
    Q_ASSERT(nprod >= 0 && nprod <= ENG_REGION_MAX);
    region_t g = {.ops = ops, .prods = prods};
    g.first[0] = 0;
    for (int i = 0; i < nprod; i++)
        g.first[i + 1] = g.first[i] + eng_prod_nchunks(&prods[i]);
    kern_pool_for(pool, g.first[nprod], region_chunk, &g);
}

void eng_matmul(kern_pool_t *pool, const kern_ops_t *ops, const eng_mat_t *W, const float *x,
                size_t ldx, const kern_act_t *act, size_t n, float *y, size_t ldy) {
    const eng_prod_t pr = {W, x, ldx, act, n, y, ldy};
    eng_matmul_many(pool, ops, &pr, 1);
}

/* Level selection, activation buffers, the row-interleaved layouts' table and small wrappers
 * shared by every level. */
#include "kernels_impl.h"

#include "alloc.h"

#include <pthread.h>

int kern_act_init(kern_act_t *act, size_t cap, size_t in, qerr_t *err) {
    memset(act, 0, sizeof *act);
    if (in < 1 || in > KERN_MAX_IN)
        return qerr_set(err, QERR_RANGE, "activation width %zu outside 1..%d", in, KERN_MAX_IN);
    if (cap < 1)
        return qerr_set(err, QERR_RANGE, "activation rows must be >= 1");
    const size_t stride = (in + KERN_ACT_PAD - 1) / KERN_ACT_PAD * KERN_ACT_PAD;
    act->q = q_aligned_calloc(cap, stride);
    act->scale = q_aligned_calloc(cap, sizeof(float));
    act->sum = q_aligned_calloc(cap, sizeof(int32_t));
    act->gsum = q_aligned_calloc(q_mul_size(cap, stride / QTYPE_INT4_GROUP), sizeof(float));
    if (!act->q || !act->scale || !act->sum || !act->gsum) {
        kern_act_free(act);
        return qerr_set(err, QERR_NOMEM, "activation buffers for %zu rows of %zu", cap, in);
    }
    act->in = in;
    act->stride = stride;
    act->cap = cap;
    return 0;
}

void kern_act_free(kern_act_t *act) {
    q_aligned_free(act->q);
    q_aligned_free(act->scale);
    q_aligned_free(act->sum);
    q_aligned_free(act->gsum);
    memset(act, 0, sizeof *act);
}

const kern_ops_t *kern_ops_for(cpu_isa_t isa) {
    if (isa > cpu_isa_detect())
        return NULL;
    switch (isa) {
    case CPU_ISA_REF: return &kern_ops_ref;
#ifdef QUILLAN_KERN_AVX2
    case CPU_ISA_AVX2: return &kern_ops_avx2;
#endif
#ifdef QUILLAN_KERN_AVX512
    case CPU_ISA_AVX512: return &kern_ops_avx512;
#endif
    default: return NULL;
    }
}

static const kern_ilv_t ILV[QTYPE_COUNT] = {
    [QTYPE_TERNARY] = {.name = "ternx",
                       .rows = KERN_TERNX_ROWS,
                       .bytes = kern_ternx_bytes,
                       .pack = kern_ternx_pack,
                       .min_batch = 1},
    [QTYPE_INT4] = {.name = "int4x",
                    .rows = KERN_INT4X_ROWS,
                    .bytes = kern_int4x_bytes,
                    .pack = kern_int4x_pack,
                    .min_batch = 2},
    [QTYPE_INT8] = {.name = "int8x",
                    .rows = KERN_INT8X_ROWS,
                    .bytes = kern_int8x_bytes,
                    .pack = kern_int8x_pack,
                    .min_batch = 2},
};

const kern_ilv_t *kern_ilv(qtype_t type) {
    Q_ASSERT((unsigned)type < QTYPE_COUNT);
    return ILV[type].name ? &ILV[type] : NULL;
}

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static const kern_ops_t *g_ops;
static qerr_t g_err;

/* Highest level at or below `isa` that this build has. */
static void select_once(void) {
    cpu_isa_t isa;
    if (cpu_isa_select(&isa, &g_err) != 0)
        return;
    for (int i = (int)isa; i >= 0 && !g_ops; i--)
        g_ops = kern_ops_for((cpu_isa_t)i);
}

int kern_init(qerr_t *err) {
    pthread_once(&g_once, select_once);
    if (!g_ops) {
        if (err)
            *err = g_err;
        return -1;
    }
    return 0;
}

const kern_ops_t *kern_ops(void) {
    Q_ASSERT(g_ops != NULL);
    return g_ops;
}

float kern_dot_q(const kern_ops_t *ops, qtype_t type, const void *row, const kern_act_t *act,
                 size_t s) {
    Q_ASSERT(s < act->n && ops->matmul_q[type]);
    kern_act_t one = *act;
    one.q = act->q + s * act->stride;
    one.scale = act->scale + s;
    one.sum = act->sum + s;
    one.gsum = act->gsum + s * (act->stride / QTYPE_INT4_GROUP);
    one.n = 1;
    float y;
    ops->matmul_q[type](row, act->in, &one, &y, 1, 0, 1);
    return y;
}

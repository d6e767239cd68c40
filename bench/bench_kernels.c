/* Rollout kernel benchmark: 4096 x 4096 matrix products with weights streamed from DRAM,
 * next to a streaming-read bandwidth probe and int8 / fp32 compute peak probes measured in the
 * same run, so figures are ratios that survive a shared, drifting machine.
 *
 *   bench_kernels [--mib M] [--rounds R] [--threads T] [--batches 1,8,16,32]
 *                 [--formats ternary,int4,int8,f16,f32,int4-f32,int8-f32] [--shapes]
 *                 [--isa ref|avx2|avx512]
 *
 * Formats: ternary, int4 and int8 multiply int8 activations (matmul_q); f16, f32 and the
 * int4-f32 / int8-f32 variants (the engine's experts, micro agents and head_int8) multiply
 * FP32 activations (matmul_f). Where the level has them (AVX-512), ternary, int4 and int8 run
 * matmul_ilv[type] at n >= kern_ilv(type)->min_batch (ternary at every n, int4 / int8 at n >= 2)
 * on row-interleaved copies of their matrices (kern_ilv(type)->pack, packed once before timing;
 * the copies are what streams from DRAM; rows "ternary x4", "int4 x16", "int8 x16": " x" and the
 * layout's panel rows); at n = 1 int4 and int8 keep the row-major matmul_q, which is
 * bandwidth-bound and reads the same bytes with less work. --isa (or QUILLAN_ISA) picks a lower
 * kernel level, e.g. the AVX2 path on an AVX-512 machine; its roofline then uses that level's own
 * peaks (256-bit FMA, and vpmaddubsw + vpmaddwd + vpaddd for int8, since AVX2 has no VNNI).
 *
 * Each format cycles through >= M MiB (default 512) of distinct copies of its matrix, so every
 * product reads its weights from DRAM (ANCHORS.md: cache-hot numbers overstate batch-1 speed
 * 2-3x). The rows of each product are split across T threads (1 and 2 by default) in static
 * contiguous ranges through kern_pool. Times are per-thread CPU times (the slowest thread; see
 * timed_t), best of R rounds (default 5) over all copies; the wall-clock time is shown too.
 * --shapes adds the quillan-512m preset's matrix shapes in the formats the engine uses. */
#include "cpu_features.h"
#include "kern_pool.h"
#include "kernels.h"
#include "rng.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define MAX_ROUNDS 64
#define MAX_BATCH 64
#define MAX_BATCHES 8

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Best of n rounds: on a shared machine the fastest round is the one least disturbed by other
 * processes, for the probes and the kernels alike. */
static double best(const double *v, int n) {
    double m = v[0];
    for (int i = 1; i < n; i++)
        m = v[i] < m ? v[i] : m;
    return m;
}

static double thread_cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* CPU time of every thread inside its share of the work, summed over the runs of one pass.
 * The machine is shared: wall-clock time includes whatever the scheduler gave to other
 * processes, a thread's CPU time does not; the slowest thread's CPU time is the pass time an
 * idle machine would see (the pool's synchronisation, a few us per run, is left out). */
typedef struct {
    kern_pool_fn fn;
    void *ctx;
    double cpu[KERN_POOL_MAX];
} timed_t;

static void timed_run(void *ctx, int tid, int nt) {
    timed_t *t = ctx;
    double t0 = thread_cpu_s();
    t->fn(t->ctx, tid, nt);
    t->cpu[tid] += thread_cpu_s() - t0;
}

static double timed_max(const timed_t *t, int nt) {
    double m = 0.0;
    for (int i = 0; i < nt; i++)
        m = t->cpu[i] > m ? t->cpu[i] : m;
    return m;
}

/* 2 MiB aligned and, where the kernel allows it, backed by transparent huge pages: a model's
 * weights are loaded once and read for hours, so the engine maps them this way too, and with
 * 4 KiB pages the streamed products would measure TLB misses as much as bandwidth. */
#define HUGE_ALIGN ((size_t)2 << 20)
static void *xalloc(size_t n) {
    const size_t len = (n + HUGE_ALIGN - 1) / HUGE_ALIGN * HUGE_ALIGN;
    void *p = aligned_alloc(HUGE_ALIGN, len);
    if (!p) {
        fprintf(stderr, "bench_kernels: out of memory (%zu bytes)\n", n);
        exit(1);
    }
#ifdef MADV_HUGEPAGE
    madvise(p, len, MADV_HUGEPAGE);
#endif
    return p;
}

/* ---- probes ---- */

typedef struct {
    const uint64_t *buf;
    size_t words;
    int streams; /* sub-streams each thread reads side by side */
    size_t pf;   /* software prefetch distance in bytes (0: none) */
    uint64_t sink[KERN_POOL_MAX];
} probe_job_t;

/* Reads the thread's share as `streams` contiguous parts side by side, 256 bytes of each per
 * step, with the widest loads available (a scalar loop tops out below the memory system's
 * rate) into independent accumulators, prefetching each part `pf` bytes ahead. */
#if defined(__x86_64__)
__attribute__((target("avx2"))) static void probe_read(void *ctx, int tid, int nt) {
    probe_job_t *j = ctx;
    size_t w0, w1;
    kern_split_rows(j->words, tid, nt, 32 * (size_t)j->streams, &w0, &w1);
    const size_t part = (w1 - w0) / (size_t)j->streams;
    __m256i a[8];
    for (int k = 0; k < 8; k++)
        a[k] = _mm256_setzero_si256();
    for (size_t i = 0; i + 32 <= part; i += 32)
        for (int s = 0; s < j->streams; s++) {
            const uint64_t *p = j->buf + w0 + (size_t)s * part + i;
            if (j->pf)
                for (int k = 0; k < 4; k++)
                    _mm_prefetch((const char *)(p + 8 * k) + j->pf, _MM_HINT_T0);
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++)
                a[k] = _mm256_add_epi64(a[k], _mm256_load_si256((const __m256i *)(p + 4 * k)));
        }
    for (int k = 1; k < 8; k++)
        a[0] = _mm256_add_epi64(a[0], a[k]);
    j->sink[tid] = (uint64_t)_mm256_extract_epi64(a[0], 0);
}
#else
static void probe_read(void *ctx, int tid, int nt) {
    probe_job_t *j = ctx;
    size_t w0, w1;
    kern_split_rows(j->words, tid, nt, 64, &w0, &w1);
    uint64_t a[8] = {0};
    for (size_t i = w0; i + 8 <= w1; i += 8)
        for (int k = 0; k < 8; k++)
            a[k] += j->buf[i + (size_t)k];
    j->sink[tid] = a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}
#endif

/* Streaming read of a 1 GiB buffer on every thread of the pool, GB/s, best of rounds: `best`
 * over the read patterns below, `plain` for one stream per thread prefetched KERN_PF_BYTES
 * ahead (ANCHORS.md's kind of probe, the base of llama.cpp's fractions there). One plain
 * stream is not the memory's limit here: 2-4 side-by-side streams read up to ~1.2x faster on
 * one thread (and the kernels, with work between their loads, faster still), so rooflines use
 * the best pattern found. */
typedef struct {
    double best, plain;
} dram_t;

static dram_t probe_dram(kern_pool_t *pool, const uint64_t *buf, size_t bytes, int rounds) {
    static const int streams[] = {1, 2, 4};
    static const size_t pfs[] = {0, 4096, KERN_PF_BYTES};
    dram_t bw = {0.0, 0.0};
    for (size_t si = 0; si < Q_ARRAY_LEN(streams); si++)
        for (size_t pi = 0; pi < Q_ARRAY_LEN(pfs); pi++) {
            probe_job_t job = {
                .buf = buf, .words = bytes / 8, .streams = streams[si], .pf = pfs[pi]};
            double t[MAX_ROUNDS] = {0};
            for (int r = 0; r < rounds; r++) {
                timed_t tj = {.fn = probe_read, .ctx = &job};
                kern_pool_run(pool, timed_run, &tj);
                t[r] = timed_max(&tj, kern_pool_size(pool));
            }
            const double g = (double)bytes / best(t, rounds) / 1e9;
            bw.best = g > bw.best ? g : bw.best;
            if (streams[si] == 1 && pfs[pi] == KERN_PF_BYTES)
                bw.plain = g;
        }
    return bw;
}

#define PEAK_ITERS 20000000L

#if defined(__x86_64__)

__attribute__((target("avx512f,avx512vnni"))) static void peak_vnni(void *ctx, int tid, int nt) {
    (void)nt;
    __m512i acc[12];
    const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
    for (int k = 0; k < 12; k++)
        acc[k] = _mm512_set1_epi32(k);
    for (long i = 0; i < PEAK_ITERS; i++) {
#pragma GCC unroll 12
        for (int k = 0; k < 12; k++)
            acc[k] = _mm512_dpbusd_epi32(acc[k], a, b);
    }
    __m512i s = acc[0];
    for (int k = 1; k < 12; k++)
        s = _mm512_add_epi32(s, acc[k]);
    ((int64_t *)ctx)[tid] = _mm512_reduce_add_epi32(s);
}

__attribute__((target("avx512f"))) static void peak_fma(void *ctx, int tid, int nt) {
    (void)nt;
    __m512 acc[12];
    const __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.999999f);
    for (int k = 0; k < 12; k++)
        acc[k] = _mm512_set1_ps((float)k);
    for (long i = 0; i < PEAK_ITERS; i++) {
#pragma GCC unroll 12
        for (int k = 0; k < 12; k++)
            acc[k] = _mm512_fmadd_ps(acc[k], a, b);
    }
    __m512 s = acc[0];
    for (int k = 1; k < 12; k++)
        s = _mm512_add_ps(s, acc[k]);
    ((int64_t *)ctx)[tid] = (int64_t)_mm512_reduce_add_ps(s);
}

/* The AVX2 level's limits: 256-bit FMA, and int8 products without VNNI (vpmaddubsw, vpmaddwd
 * against ones, vpaddd: 32 MACs per three instructions, the sequence kernels_avx2.c uses; each
 * chain feeds its own bytes back in, so nothing is loop-invariant). */
__attribute__((target("avx2,fma"))) static void peak_fma256(void *ctx, int tid, int nt) {
    (void)nt;
    __m256 acc[12];
    const __m256 a = _mm256_set1_ps(1.0000001f), b = _mm256_set1_ps(0.999999f);
    for (int k = 0; k < 12; k++)
        acc[k] = _mm256_set1_ps((float)k);
    for (long i = 0; i < PEAK_ITERS; i++) {
#pragma GCC unroll 12
        for (int k = 0; k < 12; k++)
            acc[k] = _mm256_fmadd_ps(acc[k], a, b);
    }
    __m256 s = acc[0];
    for (int k = 1; k < 12; k++)
        s = _mm256_add_ps(s, acc[k]);
    float v[8];
    _mm256_storeu_ps(v, s);
    ((int64_t *)ctx)[tid] = (int64_t)v[0];
}

__attribute__((target("avx2"))) static void peak_maddubs256(void *ctx, int tid, int nt) {
    (void)nt;
    __m256i acc[12];
    const __m256i b = _mm256_set1_epi8(2), one = _mm256_set1_epi16(1);
    for (int k = 0; k < 12; k++)
        acc[k] = _mm256_set1_epi32(k);
    for (long i = 0; i < PEAK_ITERS; i++) {
#pragma GCC unroll 12
        for (int k = 0; k < 12; k++)
            acc[k] =
                _mm256_add_epi32(acc[k], _mm256_madd_epi16(_mm256_maddubs_epi16(acc[k], b), one));
    }
    __m256i s = acc[0];
    for (int k = 1; k < 12; k++)
        s = _mm256_add_epi32(s, acc[k]);
    ((int64_t *)ctx)[tid] = _mm256_extract_epi32(s, 0);
}

#define HAVE_PEAK_PROBES 1
#endif

/* Multiply-accumulates per second of a probe running on every thread: int8 MACs for VNNI
 * (64 per instruction), fp32 FMAs for FMA (16 per instruction). The best of 7 runs: one run
 * read anywhere from 0.75 to 1 of the idle figure while another program shared the machine. */
static double probe_peak(kern_pool_t *pool, kern_pool_fn fn, double macs_per_instr) {
    double best = 0.0;
    for (int run = 0; run < 7; run++) {
        int64_t sink[KERN_POOL_MAX];
        timed_t tj = {.fn = fn, .ctx = sink};
        kern_pool_run(pool, timed_run, &tj);
        double rate = 0.0;
        for (int i = 0; i < kern_pool_size(pool); i++)
            rate += PEAK_ITERS * 12 * macs_per_instr / tj.cpu[i];
        if (rate > best)
            best = rate;
    }
    return best;
}

/* ---- products ---- */

/* A benchmarked product: weight type and activation kind. */
typedef struct {
    const char *name;
    qtype_t type;
    int fact; /* FP32 activations (matmul_f) rather than int8 codes (matmul_q) */
} format_t;

static const format_t FORMATS[] = {
    {"ternary", QTYPE_TERNARY, 0}, {"int4", QTYPE_INT4, 0}, {"int8", QTYPE_INT8, 0},
    {"f16", QTYPE_F16, 1},         {"f32", QTYPE_F32, 1},   {"int4-f32", QTYPE_INT4, 1},
    {"int8-f32", QTYPE_INT8, 1},
};
#define NFORMATS Q_ARRAY_LEN(FORMATS)

/* The row-interleaved layout whose product (matmul_ilv) format f runs on this level, or NULL:
 * FP32 activations, or a level without that product. */
static const kern_ilv_t *ilv_of(const kern_ops_t *ops, const format_t *f) {
    return f->fact || !ops->matmul_ilv[f->type] ? NULL : kern_ilv(f->type);
}

/* The layout a batch of n tokens runs on: ilv when n reaches its min_batch, else NULL. */
static const kern_ilv_t *ilv_at(const kern_ilv_t *ilv, size_t n) {
    return ilv && n >= ilv->min_batch ? ilv : NULL;
}

/* Suffix of a row's format name: " x" and the panel rows (" x4", " x16"), "" for row-major. */
typedef struct {
    char s[16];
} ilv_tag_t;

static ilv_tag_t ilv_tag(const kern_ilv_t *ilv) {
    ilv_tag_t t = {""};
    if (ilv)
        snprintf(t.s, sizeof t.s, " x%zu", ilv->rows);
    return t;
}

typedef struct {
    const kern_ops_t *ops;
    qtype_t type;
    int fact;
    const kern_ilv_t *ilv; /* w is its interleaved copy (matmul_ilv[type]); NULL: row-major */
    const uint8_t *w;
    size_t in, out;
    const kern_act_t *act;
    const float *x;
    size_t n;
    float *y;
} mm_job_t;

static void mm_run(void *ctx, int tid, int nt) {
    mm_job_t *j = ctx;
    size_t r0, r1;
    kern_split_rows(j->out, tid, nt, j->ilv ? j->ilv->rows : 4, &r0, &r1);
    if (j->ilv)
        j->ops->matmul_ilv[j->type](j->w, j->in, j->act, j->y, j->out, r0, r1);
    else if (j->fact)
        j->ops->matmul_f[j->type](j->w, j->in, j->x, j->in, j->n, j->y, j->out, r0, r1);
    else
        j->ops->matmul_q[j->type](j->w, j->in, j->act, j->y, j->out, r0, r1);
}

typedef struct {
    double us, gbps, gmacs, wall_us;
} result_t;

/* Bytes of one out x in matrix of format f, row-major or interleaved. */
static size_t matrix_bytes(const format_t *f, const kern_ilv_t *ilv, size_t out, size_t in) {
    return ilv ? ilv->bytes(out, in) : out * qtype_row_bytes(f->type, in);
}

/* Best time per product over `rounds` passes through `copies` distinct copies. */
static result_t bench_product(kern_pool_t *pool, const kern_ops_t *ops, const format_t *f,
                              const kern_ilv_t *ilv, const uint8_t *mats, size_t copies, size_t out,
                              size_t in, const kern_act_t *act, const float *x, size_t n, float *y,
                              int rounds) {
    const size_t mb = matrix_bytes(f, ilv, out, in);
    mm_job_t job = {ops, f->type, f->fact, ilv, mats, in, out, act, x, n, y};
    kern_pool_run(pool, mm_run, &job); /* warm-up: page tables, code */
    double t[MAX_ROUNDS] = {0}, wall[MAX_ROUNDS] = {0};
    for (int r = 0; r < rounds; r++) {
        timed_t tj = {.fn = mm_run, .ctx = &job};
        double t0 = now_s();
        for (size_t c = 0; c < copies; c++) {
            job.w = mats + c * mb;
            kern_pool_run(pool, timed_run, &tj);
        }
        wall[r] = (now_s() - t0) / (double)copies;
        t[r] = timed_max(&tj, kern_pool_size(pool)) / (double)copies;
    }
    double s = best(t, rounds);
    result_t res = {s * 1e6, (double)mb / s / 1e9, (double)out * in * n / s / 1e9,
                    best(wall, rounds) * 1e6};
    return res;
}

/* Fills `copies` copies of one quantized out x in matrix of N(0, 0.02) weights. */
static uint8_t *make_copies(qtype_t type, size_t out, size_t in, size_t min_bytes, size_t *copies) {
    const size_t rb = qtype_row_bytes(type, in), mb = out * rb;
    *copies = (min_bytes + mb - 1) / mb;
    if (*copies < 2)
        *copies = 2;
    uint8_t *m = xalloc(*copies * mb);
    float *row = xalloc(in * sizeof *row);
    rng_stream_t r;
    rng_stream_init(&r, 0x42454E43, out, in);
    for (size_t o = 0; o < out; o++) {
        for (size_t i = 0; i < in; i++)
            row[i] = 0.02f * rng_stream_normal(&r);
        qtype_traits(type)->quantize_row_ref(row, m + o * rb, in);
    }
    for (size_t c = 1; c < *copies; c++)
        memcpy(m + c * mb, m, mb);
    free(row);
    return m;
}

/* The interleaved copies of `copies` out x in matrices m (all alike: packs one). */
static uint8_t *ilv_copies(const kern_ilv_t *ilv, const uint8_t *m, size_t out, size_t in,
                           size_t copies) {
    const size_t xb = ilv->bytes(out, in);
    uint8_t *x = xalloc(copies * xb);
    ilv->pack(x, m, out, in);
    for (size_t c = 1; c < copies; c++)
        memcpy(x + c * xb, x, xb);
    return x;
}

typedef struct {
    const char *name;
    size_t out, in;
    const char *format; /* a FORMATS name: what the engine runs on this matrix */
} shape_t;

/* quillan-512m (configs/quillan-512m.yaml, common/model.c's tensor table): dim C 512, overseer
 * hidden 96, 32 minis of 8 experts (hidden 192) and 325 micro agents, diffusion width 1024,
 * ffn 3968, 256 plan bits, time dim 256, vocab 50257. Formats as the engine multiplies them
 * (docs/ENGINE.md): FP16 rows x FP32, INT4 / INT8 rows x FP32, ternary x int8. The micro
 * agents' rows are read one selected row at a time by the engine; the whole 325 x 512 matrix
 * stands for their bytes. */
static const shape_t SHAPES[] = {
    {"attn wq/wk/wv/wo 512x512", 512, 512, "f16"},
    {"overseer w1 96x512", 96, 512, "f16"},
    {"overseer w2 512x96", 512, 96, "f16"},
    {"micro router 325x512", 325, 512, "f16"},
    {"expert w1 192x512", 192, 512, "int4-f32"},
    {"expert w2 512x192", 512, 192, "int4-f32"},
    {"micro down 325x512", 325, 512, "int8-f32"},
    {"diffusion in_c 1024x512", 1024, 512, "ternary"},
    {"diffusion in_z/time 1024x256", 1024, 256, "ternary"},
    {"diffusion up 3968x1024", 3968, 1024, "ternary"},
    {"diffusion down 1024x3968", 1024, 3968, "ternary"},
    {"diffusion out 256x1024", 256, 1024, "ternary"},
    {"diffusion dec 512x256", 512, 256, "ternary"},
    {"head 50257x512 (f32)", 50257, 512, "f32"},
    {"head 50257x512 (head_int8)", 50257, 512, "int8-f32"},
};

static const format_t *format_find(const char *name) {
    for (size_t k = 0; k < NFORMATS; k++)
        if (strcmp(FORMATS[k].name, name) == 0)
            return &FORMATS[k];
    return NULL;
}

static int parse_list(const char *s, size_t *v, int max) {
    int k = 0;
    while (*s && k < max) {
        char *end;
        long x = strtol(s, &end, 10);
        if (end == s || x < 1 || x > MAX_BATCH)
            return -1;
        v[k++] = (size_t)x;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -1;
    }
    return k;
}

int main(int argc, char **argv) {
    size_t mib = 512, batches[MAX_BATCHES] = {1, 8, 16, 32};
    int nbatch = 4, rounds = 5, max_threads = 2, shapes = 0;
    int use[NFORMATS];
    for (size_t k = 0; k < NFORMATS; k++)
        use[k] = 1;
    const char *isa_name = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--mib") == 0 && i + 1 < argc)
            mib = (size_t)strtoul(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc)
            rounds = atoi(argv[++i]);
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            max_threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--batches") == 0 && i + 1 < argc)
            nbatch = parse_list(argv[++i], batches, MAX_BATCHES);
        else if (strcmp(argv[i], "--formats") == 0 && i + 1 < argc) {
            memset(use, 0, sizeof use);
            for (char *tok = strtok(argv[++i], ","); tok; tok = strtok(NULL, ",")) {
                const format_t *f = format_find(tok);
                if (!f) {
                    fprintf(stderr, "bench_kernels: unknown format '%s'\n", tok);
                    return 2;
                }
                use[f - FORMATS] = 1;
            }
        } else if (strcmp(argv[i], "--shapes") == 0)
            shapes = 1;
        else if (strcmp(argv[i], "--isa") == 0 && i + 1 < argc)
            isa_name = argv[++i];
        else {
            fprintf(stderr, "usage: bench_kernels [--mib M] [--rounds R] [--threads T] "
                            "[--batches 1,8,32] [--formats ternary,int4,int4-f32] [--shapes] "
                            "[--isa ref|avx2|avx512]\n");
            return 2;
        }
    }
    if (mib < 1 || rounds < 1 || rounds > MAX_ROUNDS || max_threads < 1 ||
        max_threads > KERN_POOL_MAX || nbatch < 1) {
        fprintf(stderr, "bench_kernels: bad option value (rounds 1..%d, batches 1..%d)\n",
                MAX_ROUNDS, MAX_BATCH);
        return 2;
    }
    qerr_t err;
    if (kern_init(&err) != 0) {
        fprintf(stderr, "bench_kernels: %s\n", err.msg);
        return 1;
    }
    const kern_ops_t *ops = kern_ops();
    if (isa_name) {
        cpu_isa_t isa;
        if (cpu_isa_parse(isa_name, &isa, &err) != 0) {
            fprintf(stderr, "bench_kernels: --isa: %s\n", err.msg);
            return 2;
        }
        ops = kern_ops_for(isa);
        if (!ops) {
            fprintf(stderr, "bench_kernels: --isa %s: not available in this build or CPU\n",
                    isa_name);
            return 1;
        }
    }
#ifdef HAVE_PEAK_PROBES
    const int have512 = cpu_isa_detect() == CPU_ISA_AVX512;
#endif
    printf("# bench_kernels: level %s, %zu MiB of weights per format, best of %d rounds\n\n",
           ops->name, mib, rounds);

    const size_t probe_bytes = (size_t)1 << 30;
    uint64_t *probe_buf = xalloc(probe_bytes);
    memset(probe_buf, 1, probe_bytes);

    /* Activations for the largest batch: float and int8. */
    size_t nmax = 1;
    for (int b = 0; b < nbatch; b++)
        nmax = batches[b] > nmax ? batches[b] : nmax;
    const size_t in_max = 4096;

    for (int nt = 1; nt <= max_threads; nt++) {
        kern_pool_t *pool = kern_pool_new(nt, &err);
        if (!pool) {
            fprintf(stderr, "bench_kernels: %s\n", err.msg);
            return 1;
        }
        const dram_t bw0 = probe_dram(pool, probe_buf, probe_bytes, rounds);
        double vnni = NAN, fma = NAN;
#ifdef HAVE_PEAK_PROBES
        if (have512 && strcmp(ops->name, "avx2") != 0) {
            vnni = probe_peak(pool, peak_vnni, 64.0);
            fma = probe_peak(pool, peak_fma, 16.0);
        } else if (cpu_isa_detect() >= CPU_ISA_AVX2) {
            vnni = probe_peak(pool, peak_maddubs256, 32.0);
            fma = probe_peak(pool, peak_fma256, 8.0);
        }
#endif
        printf("## %d thread%s\n\nprobes: DRAM read %.1f GB/s (before; one plain stream %.1f), "
               "int8 %s %.0f GMAC/s, fp32 FMA %s %.0f GFMA/s\n\n",
               nt, nt > 1 ? "s" : "", bw0.best, bw0.plain,
               strcmp(ops->name, "avx2") == 0 ? "vpmaddubsw 256-bit" : "VNNI 512-bit", vnni / 1e9,
               strcmp(ops->name, "avx2") == 0 ? "256-bit" : "512-bit", fma / 1e9);
        printf(
            "| format | B/weight | n | us/product | GB/s | / DRAM | / 1-stream | GMAC/s | "
            "GFLOP/s | / roofline | wall us |\n| --- | --- | --- | --- | --- | --- | --- | --- | "
            "--- | --- | --- |\n");
        float *x = xalloc(nmax * in_max * sizeof *x), *y = xalloc(nmax * 65536 * sizeof *y);
        rng_stream_t r;
        rng_stream_init(&r, 1, 2, 3);
        for (size_t i = 0; i < nmax * in_max; i++)
            x[i] = rng_stream_normal(&r);
        kern_act_t act;
        if (kern_act_init(&act, nmax, in_max, &err) != 0) {
            fprintf(stderr, "bench_kernels: %s\n", err.msg);
            return 1;
        }
        char lines[NFORMATS * MAX_BATCHES][256];
        result_t res[NFORMATS][MAX_BATCHES];
        const kern_ilv_t *ilv[NFORMATS][MAX_BATCHES]; /* ran an interleaved product */
        for (size_t k = 0; k < NFORMATS; k++) {
            if (!use[k])
                continue;
            size_t copies;
            uint8_t *mats = make_copies(FORMATS[k].type, 4096, 4096, mib << 20, &copies),
                    *xmats = NULL;
            const kern_ilv_t *il = ilv_of(ops, &FORMATS[k]);
            if (il)
                xmats = ilv_copies(il, mats, 4096, 4096, copies);
            for (int b = 0; b < nbatch; b++) {
                ilv[k][b] = ilv_at(il, batches[b]);
                ops->quantize_act(&act, x, in_max, batches[b]);
                res[k][b] =
                    bench_product(pool, ops, &FORMATS[k], ilv[k][b], ilv[k][b] ? xmats : mats,
                                  copies, 4096, 4096, &act, x, batches[b], y, rounds);
            }
            free(mats);
            free(xmats);
        }
        const dram_t bw1 = probe_dram(pool, probe_buf, probe_bytes, rounds);
        const double bw = 0.5 * (bw0.best + bw1.best), bwp = 0.5 * (bw0.plain + bw1.plain);
        int nl = 0;
        for (size_t k = 0; k < NFORMATS; k++) {
            if (!use[k])
                continue;
            const double peak = FORMATS[k].fact ? fma : vnni;
            for (int b = 0; b < nbatch; b++) {
                const result_t *e = &res[k][b];
                const double bpw =
                    (double)matrix_bytes(&FORMATS[k], ilv[k][b], 4096, 4096) / (4096.0 * 4096.0);
                double roof = bw * 1e9 * (double)batches[b] / bpw;
                if (peak < roof)
                    roof = peak;
                snprintf(lines[nl++], sizeof lines[0],
                         "| %s%s | %.4f | %zu | %.1f | %.1f | %.2f | %.2f | %.0f | %.0f | %.2f | "
                         "%.1f |",
                         FORMATS[k].name, ilv_tag(ilv[k][b]).s, bpw, batches[b], e->us, e->gbps,
                         e->gbps / bw, e->gbps / bwp, e->gmacs, 2 * e->gmacs, e->gmacs * 1e9 / roof,
                         e->wall_us);
            }
        }
        for (int i = 0; i < nl; i++)
            printf("%s\n", lines[i]);
        printf(
            "\nDRAM read after: %.1f GB/s (one plain stream %.1f); ratios use the means %.1f "
            "(/ DRAM) and %.1f GB/s (/ 1-stream, the probe of ANCHORS.md's llama.cpp fractions). "
            "Roofline = "
            "min(peak, DRAM x n / bytes per weight), peak = the VNNI (int8 activations) or "
            "FMA (FP32 activations) probe. ternary x4, int4 x16, int8 x16: the products on the "
            "interleaved copies (kern_ternx_pack, kern_int4x_pack, kern_int8x_pack), what this "
            "level runs (ternary at every n, int4 and int8 at n >= 2); plain rows are the "
            "row-major matmul_q.\n\n",
            bw1.best, bw1.plain, bw, bwp);

        if (shapes) {
            printf("### quillan-512m shapes, %d thread%s\n\n| matrix | format | n | us/product | "
                   "GB/s | / DRAM | GMAC/s | / roofline |\n| --- | --- | --- | --- | --- | --- | "
                   "--- | --- |\n",
                   nt, nt > 1 ? "s" : "");
            for (size_t k = 0; k < Q_ARRAY_LEN(SHAPES); k++) {
                const shape_t *sh = &SHAPES[k];
                const format_t *f = format_find(sh->format);
                Q_ASSERT(f != NULL);
                if (!use[f - FORMATS])
                    continue;
                size_t copies;
                uint8_t *mats = make_copies(f->type, sh->out, sh->in, mib << 20, &copies);
                const kern_ilv_t *il = ilv_of(ops, f);
                uint8_t *xmats = il ? ilv_copies(il, mats, sh->out, sh->in, copies) : NULL;
                kern_act_t a2;
                if (kern_act_init(&a2, nmax, sh->in, &err) != 0) {
                    fprintf(stderr, "bench_kernels: %s\n", err.msg);
                    return 1;
                }
                float *y2 = xalloc(nmax * sh->out * sizeof *y2);
                for (int b = 0; b < nbatch; b++) {
                    ops->quantize_act(&a2, x, in_max, batches[b]);
                    const kern_ilv_t *ib = ilv_at(il, batches[b]);
                    result_t e = bench_product(pool, ops, f, ib, ib ? xmats : mats, copies, sh->out,
                                               sh->in, &a2, x, batches[b], y2, rounds);
                    const double bpw =
                        (double)matrix_bytes(f, ib, sh->out, sh->in) / (double)(sh->out * sh->in);
                    double roof = bw * 1e9 * (double)batches[b] / bpw;
                    const double peak = f->fact ? fma : vnni;
                    if (peak < roof)
                        roof = peak;
                    printf("| %s | %s%s | %zu | %.1f | %.1f | %.2f | %.0f | %.2f |\n", sh->name,
                           f->name, ilv_tag(ib).s, batches[b], e.us, e.gbps, e.gbps / bw, e.gmacs,
                           e.gmacs * 1e9 / roof);
                }
                free(y2);
                kern_act_free(&a2);
                free(mats);
                free(xmats);
            }
            printf("\n");
        }
        kern_act_free(&act);
        free(x);
        free(y);
        kern_pool_destroy(&pool);
    }
    free(probe_buf);
    return 0;
}

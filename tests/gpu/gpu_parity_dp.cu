/* The NCCL reducer (learner/cuda/dp_nccl.h) against the in-process reducer (learner/dp.h, the
 * CPU reference), one rank per GPU present (up to DP_MAX_GPUS), each on its own host thread as
 * a single-process multi-GPU learner would run them. On one GPU this is the one-rank path every
 * learner takes: the results must be the inputs, bit for bit.
 *
 * Checks: all-reduce sum and mean of device buffers (in place on the stream) and of host
 * buffers (staged through a device bucket smaller than the buffer: several buckets), float and
 * double; broadcast from rank 0 of device and host bytes; barrier; the rendezvous file (an id
 * written with one tag is read back, a reader expecting another tag times out); a collective
 * after dp_abort fails instead of running. Tolerances: with one rank nothing is added, so bits;
 * with several, NCCL's ring/tree adds in another order than the reference's rank order, and a
 * sum of R values rounds differently by at most about R float ulps of the largest term:
 * DP_TOL = 1e-6 of the tensor's scale covers R <= 8. */
#include "gpu_parity.h"

#include <pthread.h>
#include <unistd.h>

#include "dp_nccl.h"

#define DP_MAX_GPUS 8
#define DP_N 100003           /* floats: not a multiple of anything below */
#define DP_BUCKET (64 << 10)  /* bytes: 7 buckets for DP_N floats */
#define DP_BCAST_BYTES 300001 /* broadcast: 5 buckets */
#define DP_TOL 1e-6

typedef struct {
    int rank, world;
    dp_nccl_id_t id;
    const std::vector<float> *in; /* [world] inputs */
    std::vector<float> dev_sum, dev_mean, host_sum, host_mean;
    std::vector<double> host_sum_f64;
    std::vector<unsigned char> bcast_host, bcast_dev;
    int barrier_ok, abort_fails;
    int rc;
    qerr_t err;
} rank_job_t;

static std::vector<unsigned char> bcast_pattern(int rank) {
    std::vector<unsigned char> v(DP_BCAST_BYTES);
    for (size_t i = 0; i < v.size(); i++)
        v[i] = (unsigned char)(i * 31 + (size_t)rank * 7 + 1);
    return v;
}

/* One device all-reduce: input uploaded, reduced in place on the stream, downloaded. */
static int dev_reduce(dp_comm_t *c, cudaStream_t s, const std::vector<float> &in, dp_op_t op,
                      std::vector<float> *out, qerr_t *err) {
    float *d = dev(in);
    const int rc = dp_allreduce(c, d, in.size(), DP_F32, op, err);
    CUDA_CHECK(cudaStreamSynchronize(s));
    *out = host(d, in.size());
    dfree(d);
    return rc;
}

static void *rank_run(void *p) {
    rank_job_t *j = (rank_job_t *)p;
    const int r = j->rank;
    CUDA_CHECK(cudaSetDevice(r));
    cudaStream_t s;
    CUDA_CHECK(cudaStreamCreate(&s));
    qerr_clear(&j->err);
    dp_comm_t *c = dp_nccl_comm_new(&j->id, r, j->world, r, s, DP_BUCKET, &j->err);
    j->rc = c ? 0 : -1;
    const std::vector<float> &in = j->in[r];
    if (j->rc == 0)
        j->rc = dev_reduce(c, s, in, DP_SUM, &j->dev_sum, &j->err) ||
                dev_reduce(c, s, in, DP_MEAN, &j->dev_mean, &j->err);
    if (j->rc == 0) {
        j->host_sum = in;
        j->host_mean = in;
        j->host_sum_f64.assign(in.begin(), in.end());
        j->rc = dp_allreduce(c, j->host_sum.data(), DP_N, DP_F32, DP_SUM, &j->err) ||
                dp_allreduce(c, j->host_mean.data(), DP_N, DP_F32, DP_MEAN, &j->err) ||
                dp_allreduce(c, j->host_sum_f64.data(), DP_N, DP_F64, DP_SUM, &j->err);
    }
    if (j->rc == 0) {
        j->bcast_host = bcast_pattern(r);
        std::vector<unsigned char> b = bcast_pattern(r);
        unsigned char *d = dev(b);
        j->rc = dp_broadcast(c, j->bcast_host.data(), DP_BCAST_BYTES, &j->err) ||
                dp_broadcast(c, d, DP_BCAST_BYTES, &j->err);
        CUDA_CHECK(cudaStreamSynchronize(s));
        j->bcast_dev = host(d, DP_BCAST_BYTES);
        dfree(d);
    }
    if (j->rc == 0)
        j->barrier_ok = dp_barrier(c, &j->err) == 0;
    if (c && j->rc == 0 && j->barrier_ok) {
        /* every rank aborts together here, so no peer waits on a collective that never comes */
        dp_abort(c);
        float x = 1;
        qerr_t e2;
        j->abort_fails =
            dp_allreduce(c, &x, 1, DP_F32, DP_SUM, &e2) == -1 && e2.code == QERR_INVALID;
    }
    dp_comm_destroy(&c);
    CUDA_CHECK(cudaStreamDestroy(s));
    return NULL;
}

/* The CPU reference: the in-process reducer over the same inputs. */
typedef struct {
    std::vector<float> *sum, *mean;
    std::vector<double> *sum_f64;
} ref_arg_t;

static int ref_rank(dp_comm_t *c, void *p, qerr_t *err) {
    ref_arg_t *a = (ref_arg_t *)p;
    const int r = dp_rank(c);
    return dp_allreduce(c, a->sum[r].data(), DP_N, DP_F32, DP_SUM, err) ||
                   dp_allreduce(c, a->mean[r].data(), DP_N, DP_F32, DP_MEAN, err) ||
                   dp_allreduce(c, a->sum_f64[r].data(), DP_N, DP_F64, DP_SUM, err)
               ? -1
               : 0;
}

static void check_f64(const char *name, const std::vector<double> &g, const std::vector<double> &c,
                      double tol) {
    double num = 0, den = 0;
    int finite = g.size() == c.size();
    for (size_t i = 0; finite && i < g.size(); i++) {
        finite = isfinite(g[i]) && isfinite(c[i]);
        num = fmax(num, fabs(g[i] - c[i]));
        den = fmax(den, fabs(c[i]));
    }
    const double e = den > 0 ? num / den : num;
    report(name, e, tol, finite && (tol > 0 ? e <= tol : num == 0));
}

static void check_rendezvous(void) {
    char dir[] = "/tmp/quillan_dp_nccl_XXXXXX";
    if (!mkdtemp(dir)) {
        report("dp_nccl_id_file_tmpdir", 1, 0, 0);
        return;
    }
    char path[96];
    snprintf(path, sizeof path, "%s/nccl.id", dir);
    qerr_t err;
    dp_nccl_id_t id, back, other;
    const uint64_t tag = 0x5155494c4c414eULL;
    const int w = dp_nccl_id_new(&id, &err) == 0 && dp_nccl_id_write(path, tag, &id, &err) == 0;
    const int r = w && dp_nccl_id_read(path, tag, 1.0, &back, &err) == 0;
    if (!r)
        printf("rendezvous: %s\n", err.msg);
    report("dp_nccl_id_file_round_trip", 0, 0, r && memcmp(&id, &back, sizeof id) == 0);
    const int stale = dp_nccl_id_read(path, tag + 1, 0.2, &other, &err) == -1 &&
                      err.code == QERR_TIMEOUT && strstr(err.msg, "still holds tag");
    printf("stale tag: %s\n", err.msg);
    report("dp_nccl_id_file_stale_tag_times_out", 0, 0, stale);
    /* a one-rank group through the file, the way a learner started alone would meet */
    cudaStream_t s;
    CUDA_CHECK(cudaSetDevice(0));
    CUDA_CHECK(cudaStreamCreate(&s));
    dp_comm_t *c = dp_nccl_comm_from_file(path, tag + 2, 1.0, 0, 1, 0, s, 0, &err);
    if (!c)
        printf("comm_from_file: %s\n", err.msg);
    double x = 3.25;
    const int ok = c && dp_allreduce(c, &x, 1, DP_F64, DP_SUM, &err) == 0 && x == 3.25;
    report("dp_nccl_comm_from_file_one_rank", 0, 0, ok);
    dp_comm_destroy(&c);
    CUDA_CHECK(cudaStreamDestroy(s));
    unlink(path);
    rmdir(dir);
}

int main(void) {
    const int st = parity_start("gpu_parity_dp", 0x44505050ULL, 11);
    if (st)
        return st;
    int ndev = 0;
    CUDA_CHECK(cudaGetDeviceCount(&ndev));
    const int R = ndev < DP_MAX_GPUS ? ndev : DP_MAX_GPUS;
    printf("ranks: %d (one per GPU)\n", R);

    std::vector<float> in[DP_MAX_GPUS], sum[DP_MAX_GPUS], mean[DP_MAX_GPUS];
    std::vector<double> sum64[DP_MAX_GPUS];
    for (int r = 0; r < R; r++) {
        in[r] = randn(DP_N, 1.0f + (float)r);
        sum[r] = mean[r] = in[r];
        sum64[r].assign(in[r].begin(), in[r].end());
    }
    qerr_t err;
    dp_local_t *g = dp_local_new(R, 0, &err);
    ref_arg_t ra = {sum, mean, sum64};
    if (!g || dp_local_run(g, ref_rank, &ra, &err)) {
        printf("CPU reference: %s\n", err.msg);
        report("dp_cpu_reference", 1, 0, 0);
        return parity_finish("gpu_parity_dp");
    }
    dp_local_destroy(&g);

    dp_nccl_id_t id;
    if (dp_nccl_id_new(&id, &err)) {
        printf("%s\n", err.msg);
        report("dp_nccl_id_new", 1, 0, 0);
        return parity_finish("gpu_parity_dp");
    }
    rank_job_t jobs[DP_MAX_GPUS];
    pthread_t th[DP_MAX_GPUS];
    for (int r = 0; r < R; r++) {
        jobs[r].rank = r;
        jobs[r].world = R;
        jobs[r].id = id;
        jobs[r].in = in;
        jobs[r].barrier_ok = jobs[r].abort_fails = 0;
        if (pthread_create(&th[r], NULL, rank_run, &jobs[r]) != 0) {
            fprintf(stderr, "gpu_parity_dp: cannot start the thread of rank %d\n", r);
            abort();
        }
    }
    for (int r = 0; r < R; r++)
        pthread_join(th[r], NULL);

    const std::vector<unsigned char> root = bcast_pattern(0);
    const double tol = R == 1 ? 0 : DP_TOL;
    for (int r = 0; r < R; r++) {
        rank_job_t *j = &jobs[r];
        if (j->rc) {
            printf("rank %d: %s\n", r, j->err.msg);
            report(nm("dp_nccl_rank%d_ran", r), 1, 0, 0);
            continue;
        }
        if (R == 1) {
            check_exact(nm("dp_nccl_allreduce_sum_device_r%d", r), j->dev_sum, sum[r]);
            check_exact(nm("dp_nccl_allreduce_mean_device_r%d", r), j->dev_mean, mean[r]);
            check_exact(nm("dp_nccl_allreduce_sum_host_r%d", r), j->host_sum, sum[r]);
            check_exact(nm("dp_nccl_allreduce_mean_host_r%d", r), j->host_mean, mean[r]);
        } else {
            check(nm("dp_nccl_allreduce_sum_device_r%d", r), j->dev_sum, sum[r], tol);
            check(nm("dp_nccl_allreduce_mean_device_r%d", r), j->dev_mean, mean[r], tol);
            check(nm("dp_nccl_allreduce_sum_host_r%d", r), j->host_sum, sum[r], tol);
            check(nm("dp_nccl_allreduce_mean_host_r%d", r), j->host_mean, mean[r], tol);
        }
        check_f64(nm("dp_nccl_allreduce_sum_host_f64_r%d", r), j->host_sum_f64, sum64[r],
                  R == 1 ? 0 : 1e-13);
        check_same(nm("dp_nccl_broadcast_host_r%d", r), j->bcast_host.data(), root.data(),
                   DP_BCAST_BYTES);
        check_same(nm("dp_nccl_broadcast_device_r%d", r), j->bcast_dev.data(), root.data(),
                   DP_BCAST_BYTES);
        report(nm("dp_nccl_barrier_r%d", r), 0, 0, j->barrier_ok);
        report(nm("dp_nccl_collective_after_abort_fails_r%d", r), 0, 0, j->abort_fails);
    }
    /* every rank holds the same reduced bits, whatever order NCCL used */
    for (int r = 1; r < R; r++)
        if (!jobs[r].rc && !jobs[0].rc)
            check_exact(nm("dp_nccl_ranks_agree_r%d", r), jobs[r].dev_sum, jobs[0].dev_sum);
    check_rendezvous();
    return parity_finish("gpu_parity_dp");
}

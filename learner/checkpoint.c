#include "checkpoint.h"

#include "safetensors.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

_Static_assert(sizeof(real) == 4, "checkpoints store FP32 master weights");

#define CKPT_PATH_MAX 4096

/* mkdir -p */
static int make_dirs(const char *path, qerr_t *err) {
    char buf[CKPT_PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
        return qerr_set(err, QERR_RANGE, "%s: path too long", path);
    for (char *p = buf + 1;; p++) {
        const int end = *p == '\0';
        if (*p == '/' || end) {
            *p = '\0';
            if (mkdir(buf, 0777) != 0 && errno != EEXIST)
                return qerr_set(err, QERR_IO, "%s: cannot create directory: %s", buf,
                                strerror(errno));
            if (end)
                break;
            *p = '/';
        }
    }
    return 0;
}

static void shape_of(const model_tensor_t *t, uint64_t shape[MODEL_MAX_NDIM]) {
    for (int i = 0; i < t->ndim; i++)
        shape[i] = (uint64_t)t->shape[i];
}

static int meta_u64(safetensors_writer_t *w, const char *key, uint64_t v, qerr_t *err) {
    char buf[32];
    snprintf(buf, sizeof buf, "%" PRIu64, v);
    return safetensors_writer_set_metadata(w, key, buf, err);
}

static int write_model(const char *path, const quillan_config_t *cfg, const model_t *m,
                       const checkpoint_state_t *st, qerr_t *err) {
    safetensors_writer_t *w = safetensors_writer_new();
    if (!w)
        return qerr_set(err, QERR_NOMEM, "%s: out of memory", path);
    char *yaml = NULL;
    size_t yaml_len = 0;
    FILE *f = open_memstream(&yaml, &yaml_len);
    int rc = f ? 0 : qerr_set(err, QERR_NOMEM, "%s: out of memory", path);
    if (rc == 0) {
        rc = config_print(cfg, f, err);
        fclose(f);
    }
    const real *p = model_params_const(m);
    for (size_t i = 0; rc == 0 && i < model_tensor_count(m); i++) {
        const model_tensor_t *t = model_tensor(m, i);
        uint64_t shape[MODEL_MAX_NDIM];
        shape_of(t, shape);
        rc = safetensors_writer_add(w, t->name, SAFETENSORS_F32, (size_t)t->ndim, shape,
                                    p + t->offset, err);
    }
    if (rc == 0)
        rc = safetensors_writer_set_metadata(w, "format", CHECKPOINT_FORMAT, err) ||
             safetensors_writer_set_metadata(w, "config", yaml, err) ||
             meta_u64(w, "step", (uint64_t)st->step, err) || meta_u64(w, "seed", st->seed, err) ||
             meta_u64(w, "model_seed", model_config(m)->seed, err) ||
             meta_u64(w, "diffusion_seed", model_config(m)->diffusion_seed, err) ||
             meta_u64(w, "data_epoch", st->data_epoch, err) ||
             meta_u64(w, "data_position", st->data_position, err) ||
             meta_u64(w, "data_fingerprint", st->data_fingerprint, err) ||
             meta_u64(w, "rng_key", st->rng_key, err) ||
             meta_u64(w, "rng_counter", st->rng_counter, err);
    if (rc == 0)
        rc = safetensors_writer_write(w, path, err);
    free(yaml);
    safetensors_writer_destroy(&w);
    return rc ? -1 : 0;
}

static int write_optim(const char *path, const model_t *m, const optim_t *o, qerr_t *err) {
    safetensors_writer_t *w = safetensors_writer_new();
    if (!w)
        return qerr_set(err, QERR_NOMEM, "%s: out of memory", path);
    optim_t *om = (optim_t *)o; /* the moment accessors are not const; nothing is written */
    const real *mm = optim_m(om), *vv = optim_v(om);
    int rc = 0;
    char name[MODEL_NAME_MAX + 16];
    for (size_t i = 0; rc == 0 && i < model_tensor_count(m); i++) {
        const model_tensor_t *t = model_tensor(m, i);
        if (t->kind == MODEL_PARAM_BUFFER)
            continue;
        uint64_t shape[MODEL_MAX_NDIM];
        shape_of(t, shape);
        snprintf(name, sizeof name, "%s.exp_avg", t->name);
        rc = safetensors_writer_add(w, name, SAFETENSORS_F32, (size_t)t->ndim, shape,
                                    mm + t->offset, err);
        snprintf(name, sizeof name, "%s.exp_avg_sq", t->name);
        if (rc == 0)
            rc = safetensors_writer_add(w, name, SAFETENSORS_F32, (size_t)t->ndim, shape,
                                        vv + t->offset, err);
    }
    if (rc == 0)
        rc = safetensors_writer_set_metadata(w, "format", CHECKPOINT_FORMAT, err) ||
             meta_u64(w, "step", (uint64_t)optim_steps(o), err) ||
             meta_u64(w, "skipped", (uint64_t)optim_skipped(o), err);
    if (rc == 0)
        rc = safetensors_writer_write(w, path, err);
    safetensors_writer_destroy(&w);
    return rc ? -1 : 0;
}

int checkpoint_save(const char *root, const quillan_config_t *cfg, const model_t *m,
                    const optim_t *o, const checkpoint_state_t *st, char *out_dir, size_t cap,
                    qerr_t *err) {
    char dir[CKPT_PATH_MAX], path[CKPT_PATH_MAX + 64], name[32];
    snprintf(name, sizeof name, "step-%08ld", st->step);
    if (snprintf(dir, sizeof dir, "%s/%s", root, name) >= (int)sizeof dir)
        return qerr_set(err, QERR_RANGE, "%s: checkpoint path too long", root);
    if (make_dirs(dir, err))
        return -1;
    snprintf(path, sizeof path, "%s/%s", dir, CHECKPOINT_MODEL_FILE);
    if (write_model(path, cfg, m, st, err))
        return -1;
    if (o) {
        snprintf(path, sizeof path, "%s/%s", dir, CHECKPOINT_OPTIM_FILE);
        if (write_optim(path, m, o, err))
            return -1;
    }
    char text[48];
    const int len = snprintf(text, sizeof text, "%s\n", name);
    snprintf(path, sizeof path, "%s/%s", root, CHECKPOINT_LATEST);
    if (q_file_write_atomic(path, text, (size_t)len, err))
        return -1;
    if (out_dir && cap)
        snprintf(out_dir, cap, "%s", dir);
    return 0;
}

int checkpoint_resolve(const char *path, char *dir, size_t cap, qerr_t *err) {
    char buf[CKPT_PATH_MAX + 64];
    struct stat sb;
    snprintf(buf, sizeof buf, "%s/%s", path, CHECKPOINT_MODEL_FILE);
    if (stat(buf, &sb) == 0) {
        snprintf(dir, cap, "%s", path);
        return 0;
    }
    snprintf(buf, sizeof buf, "%s/%s", path, CHECKPOINT_LATEST);
    FILE *f = fopen(buf, "r");
    if (!f)
        return qerr_set(err, QERR_NOTFOUND, "%s: no checkpoint here (neither %s nor %s)", path,
                        CHECKPOINT_MODEL_FILE, CHECKPOINT_LATEST);
    char name[256] = "";
    const int ok = fgets(name, sizeof name, f) != NULL;
    fclose(f);
    name[strcspn(name, "\r\n")] = '\0';
    if (!ok || name[0] == '\0' || strchr(name, '/') || strcmp(name, "..") == 0)
        return qerr_set(err, QERR_INVALID, "%s: expected the name of a step directory", buf);
    if (snprintf(dir, cap, "%s/%s", path, name) >= (int)cap)
        return qerr_set(err, QERR_RANGE, "%s: checkpoint path too long", path);
    return 0;
}

static int meta_get_u64(const safetensors_reader_t *r, const char *key, uint64_t *out,
                        qerr_t *err) {
    const char *s = safetensors_reader_metadata(r, key);
    if (!s)
        return qerr_set(err, QERR_INVALID, "%s: __metadata__ lacks '%s'",
                        safetensors_reader_path(r), key);
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end != '\0' || s[0] == '-')
        return qerr_set(err, QERR_INVALID,
                        "%s: __metadata__ '%s': expected an unsigned integer, "
                        "got '%s'",
                        safetensors_reader_path(r), key, s);
    *out = (uint64_t)v;
    return 0;
}

static int check_format(const safetensors_reader_t *r, qerr_t *err) {
    const char *fmt = safetensors_reader_metadata(r, "format");
    if (!fmt || strcmp(fmt, CHECKPOINT_FORMAT) != 0)
        return qerr_set(err, QERR_VERSION,
                        "%s: not a Quillan checkpoint (format '%s', expected "
                        "'%s')",
                        safetensors_reader_path(r), fmt ? fmt : "(none)", CHECKPOINT_FORMAT);
    return 0;
}

/* Copies every expected tensor (name + suffix[k] -> dst[k] + offset, for k < nk) and rejects
 * tensors the model lacks. */
static int load_tensors(const safetensors_reader_t *r, const model_t *m, int nk,
                        const char *const *suffix, real *const *dst, int skip_buffers,
                        qerr_t *err) {
    size_t expected = 0;
    char name[MODEL_NAME_MAX + 16];
    for (size_t i = 0; i < model_tensor_count(m); i++) {
        const model_tensor_t *t = model_tensor(m, i);
        if (skip_buffers && t->kind == MODEL_PARAM_BUFFER)
            continue;
        uint64_t shape[MODEL_MAX_NDIM];
        shape_of(t, shape);
        for (int k = 0; k < nk; k++) {
            expected++;
            snprintf(name, sizeof name, "%s%s", t->name, suffix[k]);
            const safetensors_tensor_t *st =
                safetensors_reader_expect(r, name, SAFETENSORS_F32, (size_t)t->ndim, shape, err);
            if (!st)
                return qerr_wrap(err, "checkpoint does not match the config");
            memcpy(dst[k] + t->offset, st->data, (size_t)st->nbytes);
        }
    }
    if (safetensors_reader_count(r) == expected)
        return 0;
    /* Every expected name was found, so the file holds extra tensors: name the first. */
    for (size_t i = 0; i < safetensors_reader_count(r); i++) {
        const char *tn = safetensors_reader_at(r, i)->name;
        int found = 0;
        for (size_t j = 0; j < model_tensor_count(m) && !found; j++)
            for (int k = 0; k < nk && !found; k++) {
                snprintf(name, sizeof name, "%s%s", model_tensor(m, j)->name, suffix[k]);
                found = strcmp(name, tn) == 0;
            }
        if (!found)
            return qerr_set(err, QERR_INVALID,
                            "checkpoint does not match the config: %s: tensor '%s' is not part "
                            "of this model",
                            safetensors_reader_path(r), tn);
    }
    return 0;
}

int checkpoint_load(const char *dir, model_t *m, optim_t *o, checkpoint_state_t *st, qerr_t *err) {
    char path[CKPT_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s", dir, CHECKPOINT_MODEL_FILE);
    safetensors_reader_t *r = safetensors_reader_new(path, err);
    if (!r)
        return -1;
    checkpoint_state_t s = {0};
    uint64_t step = 0;
    int rc = check_format(r, err) ||
             load_tensors(r, m, 1, (const char *const[]){""}, (real *const[]){model_params(m)}, 0,
                          err) ||
             meta_get_u64(r, "step", &step, err) || meta_get_u64(r, "seed", &s.seed, err) ||
             meta_get_u64(r, "data_epoch", &s.data_epoch, err) ||
             meta_get_u64(r, "data_position", &s.data_position, err) ||
             meta_get_u64(r, "data_fingerprint", &s.data_fingerprint, err) ||
             meta_get_u64(r, "rng_key", &s.rng_key, err) ||
             meta_get_u64(r, "rng_counter", &s.rng_counter, err);
    safetensors_reader_destroy(&r);
    model_params_changed(m);
    if (rc)
        return -1;
    s.step = (long)step;
    if (o) {
        snprintf(path, sizeof path, "%s/%s", dir, CHECKPOINT_OPTIM_FILE);
        r = safetensors_reader_new(path, err);
        if (!r)
            return -1;
        uint64_t osteps = 0, skipped = 0;
        rc = check_format(r, err) ||
             load_tensors(r, m, 2, (const char *const[]){".exp_avg", ".exp_avg_sq"},
                          (real *const[]){optim_m(o), optim_v(o)}, 1, err) ||
             meta_get_u64(r, "step", &osteps, err) || meta_get_u64(r, "skipped", &skipped, err);
        safetensors_reader_destroy(&r);
        if (rc)
            return -1;
        optim_set_counts(o, (long)osteps, (long)skipped);
    }
    if (st)
        *st = s;
    return 0;
}

/* Through a temporary file: the YAML loader reads files. */
int checkpoint_config_apply(quillan_config_t *cfg, const char *model_file, qerr_t *err) {
    safetensors_reader_t *r = safetensors_reader_new(model_file, err);
    if (!r)
        return -1;
    const char *yaml = safetensors_reader_metadata(r, "config");
    int rc = -1;
    if (!yaml) {
        qerr_set(err, QERR_INVALID, "%s: __metadata__ lacks 'config' (not a Quillan checkpoint?)",
                 model_file);
        goto out;
    }
    char tmp[] = "/tmp/quillan_config_XXXXXX";
    int fd = mkstemp(tmp);
    if (fd < 0) {
        qerr_set(err, QERR_IO, "cannot create a temporary file: %s", strerror(errno));
        goto out;
    }
    const size_t len = strlen(yaml);
    const int ok = write(fd, yaml, len) == (ssize_t)len;
    close(fd);
    rc = ok ? config_load(cfg, tmp, err) : qerr_set(err, QERR_IO, "cannot write %s", tmp);
    unlink(tmp);
    if (rc)
        qerr_wrap(err, "%s: the checkpoint's config", model_file);
out:
    safetensors_reader_destroy(&r);
    return rc;
}

int checkpoint_config_read(const char *path, quillan_config_t *cfg, char *dir, size_t cap,
                           qerr_t *err) {
    struct stat sb;
    if (stat(path, &sb) < 0)
        return qerr_set(err, errno == ENOENT ? QERR_NOTFOUND : QERR_IO, "%s: %s", path,
                        strerror(errno));
    if (S_ISREG(sb.st_mode)) {
        const char *slash = strrchr(path, '/');
        const int len = slash ? (int)(slash - path) : 1;
        if (snprintf(dir, cap, "%.*s", len, slash ? path : ".") >= (int)cap)
            return qerr_set(err, QERR_RANGE, "%s: checkpoint path too long", path);
    } else if (checkpoint_resolve(path, dir, cap, err) < 0) {
        return -1;
    }
    if (!cfg)
        return 0;
    char model_file[CKPT_PATH_MAX + 64];
    if (snprintf(model_file, sizeof model_file, "%s/%s", dir, CHECKPOINT_MODEL_FILE) >=
        (int)sizeof model_file)
        return qerr_set(err, QERR_RANGE, "%s: checkpoint path too long", dir);
    return checkpoint_config_apply(cfg, model_file, err);
}

model_t *checkpoint_model_load(const char *dir, const model_config_t *mc, checkpoint_state_t *st,
                               qerr_t *err) {
    model_t *m = model_new(mc, err);
    if (m && checkpoint_load(dir, m, NULL, st, err) < 0)
        model_destroy(&m);
    return m;
}

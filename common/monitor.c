#include "monitor.h"

#include "config.h"
#include "log_codec.h"
#include "net.h"
#include "net_security.h"
#include "tensorboard.h"

#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

/* Values kept per metric for sparklines and trend alerts. */
#define MON_HISTORY 48
/* Characters of a sparkline. */
#define MON_SPARK 24
#define MON_NAME_MAX 64
#define MON_RECENT 5
#define MON_TEXT_MAX 160

#define PROC_LEARNER "quillan-learner"
#define PROC_ROLLOUT "quillan-rollout"
#define PROC_REWARD "quillan-reward"

void monitor_options_init(monitor_options_t *o) {
    o->silent_after_s = 60;
    o->reward_fail_window_s = 120;
    o->ratio_collapse = 0.5;
    o->staleness_window = 5;
    o->staleness_rise = 0.5;
}

/* A learner metric (a field of learner.step or eval) with its recent values. */
typedef struct {
    char name[MON_NAME_MAX];
    double value;
    double hist[MON_HISTORY]; /* ring, oldest first from hist_head */
    int n_hist, hist_head;
} metric_t;

/* A peer process: a worker or a reward service. */
typedef struct {
    char id[MON_NAME_MAX], host[MON_NAME_MAX];
    uint64_t incarnation;
    double first_seen, last_seen;
    int restarts;
    /* workers */
    double snapshot_version, tokens_per_s, groups_done, reward_failures;
    int have_group;
    /* reward services */
    double requests, failed, latency_mean_ms, latency_max_ms;
    double last_failure; /* when `failed` last rose; 0 = never */
    int have_stats;
} peer_t;

typedef struct {
    double time;
    char line[MON_TEXT_MAX];
} recent_t;

typedef struct {
    peer_t *v;
    size_t n, cap;
} peers_t;

struct monitor {
    monitor_options_t o;
    metric_t *metrics;
    size_t n_metrics, cap_metrics;
    /* learner */
    char learner_host[MON_NAME_MAX];
    uint64_t learner_incarnation;
    double learner_last_seen, learner_last_step_time;
    int learner_restarts, have_step;
    double eval_step;
    int have_eval;
    /* workers and reward services */
    peers_t workers, rewards;
    double worker_reward_failure; /* last rollout.reward_failed / reward.unavailable */
    char worker_reward_failure_text[MON_TEXT_MAX];
    recent_t recent[MON_RECENT];
    int n_recent, recent_head;
    /* link */
    char address[256];
    uint64_t garbage, disconnects, records;
    double first_record, last_record, started;
};

monitor_t *monitor_new(const monitor_options_t *o) {
    monitor_t *m = calloc(1, sizeof *m);
    if (m == NULL)
        return NULL;
    if (o)
        m->o = *o;
    else
        monitor_options_init(&m->o);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    m->started = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    return m;
}

void monitor_destroy(monitor_t **mp) {
    if (mp == NULL || *mp == NULL)
        return;
    monitor_t *m = *mp;
    free(m->metrics);
    free(m->workers.v);
    free(m->rewards.v);
    free(m);
    *mp = NULL;
}

uint64_t monitor_records(const monitor_t *m) {
    return m->records;
}

void monitor_set_link(monitor_t *m, const char *address, uint64_t garbage, uint64_t disconnects) {
    snprintf(m->address, sizeof m->address, "%s", address ? address : "");
    m->garbage = garbage;
    m->disconnects = disconnects;
}

/* ---- state updates ---- */

/* Text from the wire goes on screen: control characters (an ESC could drive the terminal)
 * become spaces. */
static void blank_controls(char *s) {
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            *s = ' ';
}

static metric_t *metric_find(monitor_t *m, const char *name) {
    for (size_t i = 0; i < m->n_metrics; i++)
        if (strcmp(m->metrics[i].name, name) == 0)
            return &m->metrics[i];
    return NULL;
}

static metric_t *metric_get(monitor_t *m, const char *name) {
    metric_t *x = metric_find(m, name);
    if (x || strlen(name) >= MON_NAME_MAX)
        return x;
    if (m->n_metrics == m->cap_metrics) {
        size_t cap = m->cap_metrics ? 2 * m->cap_metrics : 64;
        metric_t *v = realloc(m->metrics, cap * sizeof *v);
        if (v == NULL)
            return NULL;
        m->metrics = v;
        m->cap_metrics = cap;
    }
    x = &m->metrics[m->n_metrics++];
    memset(x, 0, sizeof *x);
    snprintf(x->name, sizeof x->name, "%s", name);
    x->value = NAN;
    return x;
}

static void metric_push(metric_t *x, double v) {
    x->value = v;
    int slot = (x->hist_head + x->n_hist) % MON_HISTORY;
    if (x->n_hist == MON_HISTORY) {
        x->hist[x->hist_head] = v;
        x->hist_head = (x->hist_head + 1) % MON_HISTORY;
    } else {
        x->hist[slot] = v;
        x->n_hist++;
    }
}

/* The i-th newest-to-oldest index mapping: value k of n (0 = oldest). */
static double metric_hist(const metric_t *x, int k) {
    return x->hist[(x->hist_head + k) % MON_HISTORY];
}

static double cur(monitor_t *m, const char *name) {
    metric_t *x = metric_find(m, name);
    return x ? x->value : NAN;
}

static peer_t *peer_get(peers_t *p, const char *id, const char *host) {
    for (size_t i = 0; i < p->n; i++)
        if (strcmp(p->v[i].id, id) == 0 && strcmp(p->v[i].host, host) == 0)
            return &p->v[i];
    if (p->n == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 8;
        peer_t *v = realloc(p->v, cap * sizeof *v);
        if (v == NULL)
            return NULL;
        p->v = v;
        p->cap = cap;
    }
    peer_t *x = &p->v[p->n++];
    memset(x, 0, sizeof *x);
    snprintf(x->id, sizeof x->id, "%s", id);
    snprintf(x->host, sizeof x->host, "%s", host);
    blank_controls(x->id);
    blank_controls(x->host);
    x->snapshot_version = x->tokens_per_s = x->groups_done = NAN;
    return x;
}

static double field(const log_record_t *rec, const char *key) {
    for (size_t i = 0; i < rec->n_fields; i++)
        if (rec->fields[i].key && strcmp(rec->fields[i].key, key) == 0)
            return rec->fields[i].value;
    return NAN;
}

static void peer_seen(peer_t *x, uint64_t incarnation, double now) {
    if (x->first_seen == 0)
        x->first_seen = now;
    else if (incarnation && x->incarnation && incarnation != x->incarnation)
        x->restarts++;
    if (incarnation)
        x->incarnation = incarnation;
    x->last_seen = now;
}

static void recent_add(monitor_t *m, const log_record_t *rec, const char *who, double now) {
    recent_t *r = &m->recent[(m->recent_head + m->n_recent) % MON_RECENT];
    if (m->n_recent == MON_RECENT)
        m->recent_head = (m->recent_head + 1) % MON_RECENT;
    else
        m->n_recent++;
    r->time = now;
    snprintf(r->line, sizeof r->line, "%s %s %s: %s", log_level_name(rec->level), who, rec->event,
             rec->text ? rec->text : "");
    blank_controls(r->line);
}

static int starts_with(const char *s, const char *prefix) {
    return s && strncmp(s, prefix, strlen(prefix)) == 0;
}

void monitor_ingest(monitor_t *m, const log_record_t *rec, const char *sender, uint64_t incarnation,
                    double now) {
    m->records++;
    if (m->first_record == 0)
        m->first_record = now;
    m->last_record = now;
    const char *proc = rec->process ? rec->process : "";
    const char *host = rec->host ? rec->host : "";
    const char *event = rec->event ? rec->event : "";
    const char *who = sender && sender[0] ? sender : host;
    if (rec->level >= LOG_WARN)
        recent_add(m, rec, who, now);
    if (starts_with(proc, PROC_LEARNER)) {
        if (m->learner_incarnation && incarnation && incarnation != m->learner_incarnation)
            m->learner_restarts++;
        if (incarnation)
            m->learner_incarnation = incarnation;
        snprintf(m->learner_host, sizeof m->learner_host, "%s", host);
        blank_controls(m->learner_host);
        m->learner_last_seen = now;
        if (strcmp(event, "learner.step") == 0 || strcmp(event, "eval") == 0) {
            int is_eval = event[0] == 'e';
            for (size_t i = 0; i < rec->n_fields; i++) {
                const char *k = rec->fields[i].key;
                if (k == NULL || (is_eval && !starts_with(k, "eval/")))
                    continue;
                metric_t *x = metric_get(m, k);
                if (x)
                    metric_push(x, rec->fields[i].value);
            }
            if (is_eval) {
                m->have_eval = 1;
                m->eval_step = field(rec, "step");
            } else {
                m->have_step = 1;
                m->learner_last_step_time = now;
            }
        }
    } else if (starts_with(proc, PROC_ROLLOUT)) {
        peer_t *x = peer_get(&m->workers, who, host);
        if (x == NULL)
            return;
        peer_seen(x, incarnation, now);
        if (strcmp(event, "rollout.group") == 0) {
            x->have_group = 1;
            double v;
            if (isfinite(v = field(rec, "snapshot_version")))
                x->snapshot_version = v;
            if (isfinite(v = field(rec, "tokens_per_s")))
                x->tokens_per_s = v;
            if (isfinite(v = field(rec, "groups_done")))
                x->groups_done = v;
            if (isfinite(v = field(rec, "reward_failures")))
                x->reward_failures = v;
        } else if (strcmp(event, "rollout.reward_failed") == 0 ||
                   strcmp(event, "reward.unavailable") == 0 ||
                   strcmp(event, "reward.failed") == 0) {
            m->worker_reward_failure = now;
            snprintf(m->worker_reward_failure_text, sizeof m->worker_reward_failure_text, "%s: %s",
                     who, rec->text ? rec->text : event);
            blank_controls(m->worker_reward_failure_text);
        }
    } else if (starts_with(proc, PROC_REWARD)) {
        peer_t *x = peer_get(&m->rewards, who, host);
        if (x == NULL)
            return;
        peer_seen(x, incarnation, now);
        if (strcmp(event, "reward.stats") == 0 || strcmp(event, "reward.stop") == 0) {
            double failed = field(rec, "failed");
            if (isfinite(failed) && x->have_stats && failed > x->failed)
                x->last_failure = now;
            else if (isfinite(failed) && !x->have_stats && failed > 0)
                x->last_failure = now;
            x->have_stats = 1;
            double v;
            if (isfinite(v = field(rec, "requests")))
                x->requests = v;
            if (isfinite(failed))
                x->failed = failed;
            if (isfinite(v = field(rec, "latency_mean_ms")))
                x->latency_mean_ms = v;
            if (isfinite(v = field(rec, "latency_max_ms")))
                x->latency_max_ms = v;
        } else if (rec->level >= LOG_ERROR) {
            x->last_failure = now;
        }
    }
}

/* ---- text building ---- */

typedef struct {
    char *p;
    size_t len, cap;
    int oom;
} sbuf_t;

static void sb_put(sbuf_t *b, const char *s, size_t n) {
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (p == NULL) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_printf(sbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf_t *b, const char *fmt, ...) {
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0)
        sb_put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* A screen line under construction: text is cut at the view's width, counting UTF-8
 * characters and skipping ANSI escapes. */
typedef struct {
    sbuf_t *out;
    const monitor_view_t *v;
    int col;
} line_t;

static void ln_put(line_t *l, const char *s) {
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        if (*p == 0x1b) { /* an escape sequence takes no column */
            const unsigned char *e = p + 1;
            if (*e == '[')
                for (e++; *e && !(*e >= 0x40 && *e <= 0x7e); e++)
                    ;
            if (*e)
                e++;
            if (l->v->color)
                sb_put(l->out, (const char *)p, (size_t)(e - p));
            p = e;
            continue;
        }
        size_t n = 1;
        if (*p >= 0xc0)
            while ((p[n] & 0xc0) == 0x80)
                n++;
        if (l->col < l->v->width)
            sb_put(l->out, (const char *)p, n);
        l->col++;
        p += n;
    }
}

static void ln_printf(line_t *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void ln_printf(line_t *l, const char *fmt, ...) {
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    ln_put(l, tmp);
}

static void ln_end(line_t *l) {
    if (l->v->color)
        sb_put(l->out, "\x1b[0m", 4);
    sb_put(l->out, "\n", 1);
    l->col = 0;
}

#define BOLD "\x1b[1m"
#define DIM "\x1b[2m"
#define RED "\x1b[31m"
#define GREEN "\x1b[32m"
#define YELLOW "\x1b[33m"
#define CYAN "\x1b[36m"
#define RESET "\x1b[0m"

/* A number in at most ~9 characters; "-" when unknown. */
static const char *num(char *buf, size_t cap, double v) {
    if (!isfinite(v))
        snprintf(buf, cap, "-");
    else if (v == floor(v) && fabs(v) < 1e7)
        snprintf(buf, cap, "%.0f", v);
    else if (fabs(v) >= 1e5 || fabs(v) < 1e-3)
        snprintf(buf, cap, "%.3g", v);
    else if (fabs(v) >= 100)
        snprintf(buf, cap, "%.1f", v);
    else
        snprintf(buf, cap, "%.4f", v);
    return buf;
}
#define NUM(v) num((char[32]){0}, 32, (v))

static const char *ago(char *buf, size_t cap, double dt) {
    if (dt < 0)
        dt = 0;
    if (dt < 120)
        snprintf(buf, cap, "%.0f s ago", dt);
    else if (dt < 7200)
        snprintf(buf, cap, "%.0f min ago", dt / 60);
    else
        snprintf(buf, cap, "%.1f h ago", dt / 3600);
    return buf;
}
#define AGO(dt) ago((char[32]){0}, 32, (dt))

static void sparkline(line_t *l, const metric_t *x) {
    static const char *const blocks[8] = {"\u2581", "\u2582", "\u2583", "\u2584",
                                          "\u2585", "\u2586", "\u2587", "\u2588"};
    static const char ascii[8] = {'_', '.', ',', '-', '=', '+', '*', '#'};
    if (x == NULL)
        return;
    int n = x->n_hist < MON_SPARK ? x->n_hist : MON_SPARK;
    int k0 = x->n_hist - n;
    double lo = INFINITY, hi = -INFINITY;
    for (int k = k0; k < x->n_hist; k++) {
        double v = metric_hist(x, k);
        if (isfinite(v)) {
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
    }
    for (int k = k0; k < x->n_hist; k++) {
        double v = metric_hist(x, k);
        int level = 0;
        if (!isfinite(v)) {
            ln_put(l, " ");
            continue;
        }
        if (hi > lo)
            level = (int)((v - lo) / (hi - lo) * 7.0 + 0.5);
        else
            level = 3;
        if (l->v->utf8) {
            ln_put(l, blocks[level]);
        } else {
            char c[2] = {ascii[level], 0};
            ln_put(l, c);
        }
    }
    for (int k = n; k < MON_SPARK; k++)
        ln_put(l, " ");
}

/* "  name        value  sparkline  extra" */
static void metric_row(line_t *l, monitor_t *m, const char *name, const char *extra) {
    metric_t *x = metric_find(m, name);
    ln_printf(l, "  %-22s %10s  ", name, NUM(x ? x->value : NAN));
    sparkline(l, x);
    if (x == NULL)
        ln_put(l, "                        ");
    if (extra && extra[0])
        ln_printf(l, "  %s", extra);
    ln_end(l);
}

/* Appends every alert as a line of text. */
static void alerts_build(monitor_t *m, double now, sbuf_t *b) {
    const monitor_options_t *o = &m->o;
    if (m->records == 0 && now - m->started > o->silent_after_s)
        sb_printf(b, "no records from %s for %.0f s: is the learner's log hub up?\n",
                  m->address[0] ? m->address : "the hub", now - m->started);
    if (m->learner_last_seen > 0 && now - m->learner_last_seen > o->silent_after_s)
        sb_printf(b, "learner silent for %.0f s\n", now - m->learner_last_seen);
    for (size_t i = 0; i < m->workers.n; i++) {
        peer_t *x = &m->workers.v[i];
        if (now - x->last_seen > o->silent_after_s)
            sb_printf(b, "worker %s@%s silent for %.0f s\n", x->id, x->host, now - x->last_seen);
    }
    for (size_t i = 0; i < m->rewards.n; i++) {
        peer_t *x = &m->rewards.v[i];
        if (x->last_failure > 0 && now - x->last_failure <= o->reward_fail_window_s)
            sb_printf(b, "reward service %s@%s failing: %s failed requests, last %s\n", x->id,
                      x->host, NUM(x->failed), AGO(now - x->last_failure));
    }
    if (m->worker_reward_failure > 0 && now - m->worker_reward_failure <= o->reward_fail_window_s)
        sb_printf(b, "reward calls failing (%s): %s\n", AGO(now - m->worker_reward_failure),
                  m->worker_reward_failure_text);
    const char *ratios[] = {"policy/ratio_mean", "tis/mean_weight"};
    for (size_t i = 0; i < 2; i++) {
        double r = cur(m, ratios[i]);
        if (isfinite(r) && r < o->ratio_collapse)
            sb_printf(b,
                      "importance ratio collapsing: %s = %s (< %g): are workers on the "
                      "learner's weights?\n",
                      ratios[i], NUM(r), o->ratio_collapse);
    }
    metric_t *st = metric_find(m, "staleness/mean");
    int w = o->staleness_window;
    if (st && w >= 2 && st->n_hist >= w) {
        int rising = 1;
        for (int k = st->n_hist - w + 1; k < st->n_hist; k++)
            rising &= metric_hist(st, k) >= metric_hist(st, k - 1);
        double first = metric_hist(st, st->n_hist - w), last = metric_hist(st, st->n_hist - 1);
        if (rising && last - first >= o->staleness_rise)
            sb_printf(b, "staleness rising: %s -> %s versions over the last %d steps\n", NUM(first),
                      NUM(last), w);
    }
    /* Workers that cannot keep up waste most of their work: more stale groups than kept. */
    double stale = cur(m, "groups/stale"), kept = cur(m, "groups/kept");
    if (isfinite(stale) && isfinite(kept) && stale > kept)
        sb_printf(b, "more groups dropped as stale (%s) than kept (%s) at the last step\n",
                  NUM(stale), NUM(kept));
}

char *monitor_alerts(monitor_t *m, double now) {
    sbuf_t b = {0};
    sb_put(&b, "", 0);
    alerts_build(m, now, &b);
    if (b.oom) {
        free(b.p);
        return NULL;
    }
    return b.p;
}

static void hms(char *buf, size_t cap, double t) {
    time_t s = (time_t)t;
    struct tm tm;
    localtime_r(&s, &tm);
    strftime(buf, cap, "%H:%M:%S", &tm);
}

char *monitor_render(monitor_t *m, double now, const monitor_view_t *v) {
    sbuf_t b = {0};
    sb_put(&b, "", 0);
    line_t l = {&b, v, 0};
    char t[32];
    hms(t, sizeof t, now);
    ln_printf(&l,
              BOLD "quillan monitor" RESET "  %s  %s  records %llu  garbage %llu  "
                   "disconnects %llu",
              m->address, t, (unsigned long long)m->records, (unsigned long long)m->garbage,
              (unsigned long long)m->disconnects);
    ln_end(&l);
    if (m->records == 0) {
        ln_printf(&l, "waiting for records (%.0f s)...", now - m->started);
        ln_end(&l);
    }

    /* learner */
    if (m->learner_last_seen > 0) {
        ln_printf(&l,
                  BOLD CYAN "learner" RESET "  %s  " BOLD "step %s" RESET
                            "  policy v%s (old v%s)  restarts %d  last step %s",
                  m->learner_host, NUM(cur(m, "step")), NUM(cur(m, "policy/version")),
                  NUM(cur(m, "policy/old_version")), m->learner_restarts,
                  m->have_step ? AGO(now - m->learner_last_step_time) : "-");
        ln_end(&l);
    } else {
        ln_put(&l, BOLD CYAN "learner" RESET "  not heard from yet");
        ln_end(&l);
    }
    char extra[160];
    snprintf(extra, sizeof extra, "min %s max %s std %s", NUM(cur(m, "reward/min")),
             NUM(cur(m, "reward/max")), NUM(cur(m, "reward/std")));
    metric_row(&l, m, "reward/mean", extra);
    snprintf(extra, sizeof extra, "%s", m->have_eval ? "" : "no eval yet");
    if (m->have_eval)
        snprintf(extra, sizeof extra, "at step %s", NUM(m->eval_step));
    metric_row(&l, m, "eval/accuracy", extra);
    metric_row(&l, m, "policy/entropy", "");
    snprintf(extra, sizeof extra, "max %s truncated %s", NUM(cur(m, "response_length/max")),
             NUM(cur(m, "response/truncated_frac")));
    metric_row(&l, m, "response_length/mean", extra);
    snprintf(extra, sizeof extra, "stale groups %s", NUM(cur(m, "groups/stale")));
    metric_row(&l, m, "staleness/mean", extra);
    snprintf(extra, sizeof extra, "is [%s, %s]", NUM(cur(m, "mismatch/is_min")),
             NUM(cur(m, "mismatch/is_max")));
    metric_row(&l, m, "mismatch/kl", extra);
    snprintf(extra, sizeof extra, "sync %s bytes in %s s", NUM(cur(m, "sync/bytes")),
             NUM(cur(m, "sync/publish_seconds")));
    metric_row(&l, m, "snapshot/changed_frac", extra);
    ln_printf(&l, "  loss      pg %s  total %s  balance %s  z %s  diffusion %s",
              NUM(cur(m, "loss/pg")), NUM(cur(m, "loss/total")), NUM(cur(m, "loss/balance")),
              NUM(cur(m, "loss/z")), NUM(cur(m, "loss/diffusion")));
    ln_end(&l);
    ln_printf(&l, "  clip      low %s  high %s  dual %s  ratio %s  approx_kl %s  kl_ref %s",
              NUM(cur(m, "policy/clipfrac_low")), NUM(cur(m, "policy/clipfrac_high")),
              NUM(cur(m, "policy/clipfrac_dual")), NUM(cur(m, "policy/ratio_mean")),
              NUM(cur(m, "policy/approx_kl")), NUM(cur(m, "policy/kl_ref")));
    ln_end(&l);
    ln_printf(&l, "  tis       mean_weight %s  clipped %s   grad_norm %s  lr %s",
              NUM(cur(m, "tis/mean_weight")), NUM(cur(m, "tis/clipped_frac")),
              NUM(cur(m, "grad_norm")), NUM(cur(m, "lr")));
    ln_end(&l);
    ln_printf(&l, "  tokens/s  learner %s  rollout %s   step %s s  wait %s s",
              NUM(cur(m, "perf/learner_tokens_per_s")), NUM(cur(m, "perf/rollout_tokens_per_s")),
              NUM(cur(m, "perf/step_seconds")), NUM(cur(m, "perf/wait_seconds")));
    ln_end(&l);
    ln_printf(&l, "  groups    kept %s  filtered_equal %s  stale %s", NUM(cur(m, "groups/kept")),
              NUM(cur(m, "groups/filtered_equal")), NUM(cur(m, "groups/stale")));
    ln_end(&l);

    /* workers */
    ln_printf(&l, BOLD CYAN "workers" RESET " (%zu)", m->workers.n);
    ln_end(&l);
    if (m->workers.n) {
        ln_printf(&l, DIM "  %-16s %-16s %8s %10s %8s %8s  %s" RESET, "worker", "host", "snapshot",
                  "tokens/s", "groups", "rew.fail", "last seen");
        ln_end(&l);
    }
    for (size_t i = 0; i < m->workers.n; i++) {
        peer_t *x = &m->workers.v[i];
        int silent = now - x->last_seen > m->o.silent_after_s;
        char ver[34];
        snprintf(ver, sizeof ver, "v%s", NUM(x->snapshot_version));
        ln_printf(&l, "%s  %-16.16s %-16.16s %8s %10s %8s %8s  %s%s" RESET, silent ? RED : "",
                  x->id, x->host, ver, NUM(x->tokens_per_s), NUM(x->groups_done),
                  NUM(x->reward_failures), AGO(now - x->last_seen),
                  x->restarts ? " (restarted)" : "");
        ln_end(&l);
    }

    /* reward services */
    ln_printf(&l, BOLD CYAN "reward services" RESET " (%zu)", m->rewards.n);
    ln_end(&l);
    if (m->rewards.n) {
        ln_printf(&l, DIM "  %-16s %-16s %8s %8s %10s %10s  %s" RESET, "service", "host",
                  "requests", "failed", "mean ms", "max ms", "last seen");
        ln_end(&l);
    }
    for (size_t i = 0; i < m->rewards.n; i++) {
        peer_t *x = &m->rewards.v[i];
        int failing = x->last_failure > 0 && now - x->last_failure <= m->o.reward_fail_window_s;
        ln_printf(&l, "%s  %-16.16s %-16.16s %8s %8s %10s %10s  %s" RESET, failing ? RED : "",
                  x->id, x->host, x->have_stats ? NUM(x->requests) : "-",
                  x->have_stats ? NUM(x->failed) : "-",
                  x->have_stats ? NUM(x->latency_mean_ms) : "-",
                  x->have_stats ? NUM(x->latency_max_ms) : "-", AGO(now - x->last_seen));
        ln_end(&l);
    }

    /* alerts */
    sbuf_t a = {0};
    sb_put(&a, "", 0);
    alerts_build(m, now, &a);
    ln_put(&l, BOLD CYAN "alerts" RESET);
    ln_end(&l);
    if (a.p && a.p[0]) {
        for (char *s = a.p, *e; s && *s; s = e ? e + 1 : NULL) {
            e = strchr(s, '\n');
            if (e)
                *e = '\0';
            ln_printf(&l, RED BOLD "  ! %s" RESET, s);
            ln_end(&l);
        }
    } else {
        ln_put(&l, GREEN "  none" RESET);
        ln_end(&l);
    }
    free(a.p);

    /* latest warnings and errors */
    if (m->n_recent) {
        ln_put(&l, BOLD CYAN "recent warnings" RESET);
        ln_end(&l);
        for (int k = m->n_recent - 1; k >= 0; k--) {
            const recent_t *r = &m->recent[(m->recent_head + k) % MON_RECENT];
            hms(t, sizeof t, r->time);
            ln_printf(&l, YELLOW "  %s %s" RESET, t, r->line);
            ln_end(&l);
        }
    }
    if (b.oom) {
        free(b.p);
        return NULL;
    }
    return b.p;
}

/* ---- quillan monitor ---- */

#define MON_FIELDS_MAX 512
#define MON_DEFAULT_PORT 5558

static volatile sig_atomic_t mon_stop;

static void mon_on_signal(int sig) {
    (void)sig;
    mon_stop = 1;
}

static void mon_usage(FILE *out) {
    fprintf(
        out,
        "usage: quillan monitor ADDRESS|--config FILE [--jsonl] [--filter EVENT,...] [options]\n"
        "\n"
        "Watches a run through the learner's log hub (network.log_out, default port %d):\n"
        "a live dashboard of the learner's metrics, the workers, the reward services and\n"
        "alerts. ADDRESS is a ZeroMQ endpoint (tcp://HOST:PORT) or HOST[:PORT]. It waits\n"
        "for a hub that is not up yet and reconnects when the learner restarts.\n"
        "\n"
        "options:\n"
        "  --jsonl            print the records instead, one JSON object per line (the\n"
        "                     log-file format plus \"sender\"); `quillan plot` reads it\n"
        "  --filter E,...     only these events; a name ending in '*' is a prefix\n"
        "                     (e.g. --filter learner.step,eval,rollout.*)\n"
        "  --interval S       seconds between screen updates (default 1; 10 when stdout is\n"
        "                     not a terminal: then each update is printed as plain text)\n"
        "  --duration S       exit 0 after S seconds (default: run until Ctrl-C)\n"
        "  --silent-after S   alert when a worker or the learner is silent this long (60)\n"
        "  --tensorboard DIR  also write learner.step and eval records as TensorBoard\n"
        "                     scalars into DIR\n"
        "  --no-color         no ANSI colours even on a terminal\n"
        "  --config FILE      the run's config: its security section (CurveZMQ: this\n"
        "                     monitor is a client, security.keys.client and the\n"
        "                     server's public key) and, without ADDRESS, network.log_out\n"
        "  --set K=V          override a config key (with or without --config)\n"
        "  --help             this text\n"
        "\n"
        "On a terminal the screen is redrawn in place with colours; otherwise plain text.\n"
        "Messages that are not log records are dropped and counted (\"garbage\").\n",
        MON_DEFAULT_PORT);
}

typedef struct {
    const char *address_arg;
    char address[256];
    int jsonl, no_color;
    char **filters;
    size_t n_filters;
    double interval, duration, silent_after;
    const char *tensorboard;
    const char *config;
    char **sets;
    size_t n_sets;
} mon_args_t;

static int filter_match(const mon_args_t *a, const char *event) {
    if (a->n_filters == 0)
        return 1;
    for (size_t i = 0; i < a->n_filters; i++) {
        const char *f = a->filters[i];
        size_t n = strlen(f);
        if (n && f[n - 1] == '*' ? strncmp(event, f, n - 1) == 0 : strcmp(event, f) == 0)
            return 1;
    }
    return 0;
}

/* "tcp://h:p", "ipc://..." and "inproc://..." as they are; "HOST[:PORT]" becomes tcp://. */
static int address_normalize(const char *in, char *out, size_t cap) {
    int n;
    if (strstr(in, "://"))
        n = snprintf(out, cap, "%s", in);
    else if (strchr(in, ':'))
        n = snprintf(out, cap, "tcp://%s", in);
    else
        n = snprintf(out, cap, "tcp://%s:%d", in, MON_DEFAULT_PORT);
    return n > 0 && (size_t)n < cap && in[0] ? 0 : -1;
}

static int parse_seconds(const char *opt, const char *v, double lo, double *out) {
    char *end;
    double x = strtod(v, &end);
    if (end == v || *end || !isfinite(x) || x < lo) {
        fprintf(stderr, "quillan monitor: %s: '%s' is not a number of seconds >= %g\n", opt, v, lo);
        return -1;
    }
    *out = x;
    return 0;
}

static int filters_parse(mon_args_t *a, const char *list) {
    const char *p = list;
    while (*p) {
        const char *e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (n > 0) {
            char **v = realloc(a->filters, (a->n_filters + 1) * sizeof *v);
            if (v == NULL)
                return -1;
            a->filters = v;
            if ((v[a->n_filters] = strndup(p, n)) == NULL)
                return -1;
            a->n_filters++;
        }
        p += n + (e ? 1 : 0);
    }
    if (a->n_filters == 0) {
        fprintf(stderr, "quillan monitor: --filter: no event names in '%s'\n", list);
        return -1;
    }
    return 0;
}

/* 0 ok, 1 --help shown, 2 usage error. */
static int mon_args_parse(int argc, char **argv, mon_args_t *a) {
    a->interval = -1;
    a->silent_after = 60;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) {
            mon_usage(stdout);
            return 1;
        }
        if (!strcmp(o, "--jsonl")) {
            a->jsonl = 1;
        } else if (!strcmp(o, "--no-color")) {
            a->no_color = 1;
        } else if (!strcmp(o, "--filter") || !strcmp(o, "--interval") || !strcmp(o, "--duration") ||
                   !strcmp(o, "--silent-after") || !strcmp(o, "--tensorboard") ||
                   !strcmp(o, "--config") || !strcmp(o, "--set")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "quillan monitor: %s needs a value\n", o);
                return 2;
            }
            const char *v = argv[++i];
            int rc = 0;
            if (!strcmp(o, "--filter"))
                rc = filters_parse(a, v);
            else if (!strcmp(o, "--interval"))
                rc = parse_seconds(o, v, 0.05, &a->interval);
            else if (!strcmp(o, "--duration"))
                rc = parse_seconds(o, v, 0, &a->duration);
            else if (!strcmp(o, "--silent-after"))
                rc = parse_seconds(o, v, 1, &a->silent_after);
            else if (!strcmp(o, "--config"))
                a->config = v;
            else if (!strcmp(o, "--set")) {
                char **sv = realloc(a->sets, (a->n_sets + 1) * sizeof *sv);
                if (sv == NULL)
                    return 2;
                a->sets = sv;
                sv[a->n_sets++] = (char *)v;
            } else
                a->tensorboard = v;
            if (rc != 0)
                return 2;
        } else if (o[0] == '-' && o[1] != '\0') {
            fprintf(stderr, "quillan monitor: unknown option '%s'\n", o);
            return 2;
        } else if (a->address_arg) {
            fprintf(stderr, "quillan monitor: more than one ADDRESS ('%s', '%s')\n", a->address_arg,
                    o);
            return 2;
        } else {
            a->address_arg = o;
        }
    }
    if (a->address_arg == NULL && a->config == NULL) {
        mon_usage(stderr);
        return 2;
    }
    if (a->address_arg == NULL)
        return 0; /* network.log_out of the config, once it is loaded */
    if (address_normalize(a->address_arg, a->address, sizeof a->address) != 0) {
        fprintf(stderr, "quillan monitor: bad ADDRESS '%s'\n", a->address_arg);
        return 2;
    }
    return 0;
}

static double mon_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* One record as a JSON line: the log-file format with the Envelope's sender added. */
static void jsonl_print(const log_record_t *rec, const char *sender) {
    char stack[8192];
    char *line = stack;
    size_t n = log_record_format_json(rec, stack, sizeof stack);
    if (n >= sizeof stack) {
        line = malloc(n + 1);
        if (line == NULL)
            return;
        log_record_format_json(rec, line, n + 1);
    }
    if (n >= 2 && line[n - 2] == '}' && sender && sender[0]) {
        fwrite(line, 1, n - 2, stdout);
        fputs(",\"sender\":\"", stdout);
        for (const unsigned char *p = (const unsigned char *)sender; *p; p++) {
            if (*p == '"' || *p == '\\')
                printf("\\%c", *p);
            else if (*p < 0x20)
                printf("\\u%04x", *p);
            else
                putchar(*p);
        }
        fputs("\"}\n", stdout);
    } else {
        fwrite(line, 1, n, stdout);
    }
    if (line != stack)
        free(line);
    fflush(stdout);
}

static int env_utf8(void) {
    const char *vars[] = {"LC_ALL", "LC_CTYPE", "LANG"};
    for (size_t i = 0; i < 3; i++) {
        const char *v = getenv(vars[i]);
        if (v && v[0])
            return strcasestr(v, "utf-8") != NULL || strcasestr(v, "utf8") != NULL;
    }
    return 0;
}

static int term_width(void) {
    struct winsize ws;
    if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 20)
        return ws.ws_col;
    const char *c = getenv("COLUMNS");
    int w = c ? atoi(c) : 0;
    return w > 20 ? w : 120;
}

static void screen_draw(const char *frame, int tty, double now) {
    if (!tty) {
        char t[32];
        hms(t, sizeof t, now);
        printf("---- %s\n%s", t, frame);
        fflush(stdout);
        return;
    }
    fputs("\x1b[H", stdout); /* home, then each line overwritten and its tail cleared */
    for (const char *p = frame; *p;) {
        const char *e = strchr(p, '\n');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        fwrite(p, 1, n, stdout);
        fputs("\x1b[K\n", stdout);
        p += n + (e ? 1 : 0);
    }
    fputs("\x1b[J", stdout);
    fflush(stdout);
}

int cli_monitor_main(int argc, char **argv) {
    mon_args_t a = {0};
    int prc = mon_args_parse(argc, argv, &a);
    if (prc != 0) {
        for (size_t i = 0; i < a.n_filters; i++)
            free(a.filters[i]);
        free(a.filters);
        free(a.sets);
        return prc == 1 ? 0 : 2;
    }
    const int tty = isatty(STDOUT_FILENO);
    if (a.interval < 0)
        a.interval = tty ? 1 : 10;
    /* The dashboard owns the terminal; our own log lines (net.drop of garbage, say) would
     * scroll it. With --jsonl stdout carries records and stderr may say what went wrong. */
    log_init("quillan-monitor");
    log_set_level(LOG_WARN);
    if (!a.jsonl)
        log_set_stderr(0);

    struct sigaction sa = {0};
    sa.sa_handler = mon_on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    qerr_t err = {0};
    int rc = 0;
    net_security_t sec = {.mode = NET_SECURITY_NONE};
    if (a.config || a.n_sets) {
        quillan_config_t *cfg = malloc(sizeof *cfg);
        if (cfg == NULL)
            rc = qerr_set(&err, QERR_NOMEM, "out of memory");
        else
            config_defaults(cfg);
        if (rc == 0 && a.config)
            rc = config_load(cfg, a.config, &err);
        for (size_t i = 0; rc == 0 && i < a.n_sets; i++)
            rc = config_set(cfg, a.sets[i], &err);
        if (rc == 0)
            rc = net_security_from_config(cfg, NET_ROLE_CLIENT, &sec, &err);
        if (rc == 0 && a.address_arg == NULL)
            snprintf(a.address, sizeof a.address, "%s", cfg->network.log_out);
        free(cfg);
    }
    monitor_options_t mo;
    monitor_options_init(&mo);
    mo.silent_after_s = a.silent_after;
    monitor_t *m = monitor_new(&mo);
    log_field_t *fields = malloc(MON_FIELDS_MAX * sizeof *fields);
    void *zctx = zmq_ctx_new();
    net_socket_t *s = NULL;
    tensorboard_writer_t *tb = NULL;
    if (rc == 0 && (m == NULL || fields == NULL || zctx == NULL))
        rc = qerr_set(&err, QERR_NOMEM, "out of memory");
    if (rc == 0 && a.tensorboard && (tb = tensorboard_writer_new(a.tensorboard, &err)) == NULL)
        rc = -1;
    if (rc == 0) {
        net_options_t opt;
        net_options_init(&opt);
        opt.linger_ms = 0;
        opt.rcvhwm = 100000; /* a burst of records waits here rather than in the hub */
        net_socket_spec_t spec = {.type = ZMQ_SUB,
                                  .protocol = WIRE_PROTOCOL_LOG,
                                  .name = "monitor",
                                  .sender_id = "quillan-monitor",
                                  .incarnation_id = net_incarnation_new(),
                                  .validate = log_codec_net_validate};
        s = net_socket_new(zctx, &spec, &opt, &sec, &err);
        if (s == NULL)
            rc = -1;
        else if (zmq_setsockopt(net_socket_handle(s), ZMQ_SUBSCRIBE, "", 0) != 0)
            rc = qerr_set(&err, QERR_IO, "subscribe: %s", zmq_strerror(zmq_errno()));
        else if (net_socket_connect(s, a.address, &err) != 0)
            rc = -1;
    }
    const monitor_view_t view0 = {.width = 120, .color = tty && !a.no_color, .utf8 = env_utf8()};
    if (rc == 0 && tty && !a.jsonl)
        fputs("\x1b[?25l\x1b[?7l\x1b[2J", stdout); /* hide the cursor, no line wrap, clear */
    const double t0 = mon_now();
    double next_draw = t0;
    uint64_t tb_failures = 0;
    while (rc == 0 && !mon_stop) {
        double now = mon_now();
        if (a.duration > 0 && now - t0 >= a.duration)
            break;
        if (!a.jsonl && now >= next_draw) {
            net_stats_t st;
            net_socket_stats(s, &st);
            uint64_t garbage = 0;
            for (int r = 0; r < NET_DROP_COUNT; r++)
                garbage += st.dropped[r];
            monitor_set_link(m, a.address, garbage, st.disconnects);
            monitor_view_t v = view0;
            v.width = tty ? term_width() : 120;
            char *frame = monitor_render(m, now, &v);
            if (frame)
                screen_draw(frame, tty, now);
            free(frame);
            next_draw = now + a.interval;
        }
        double until = a.jsonl ? now + 0.2 : next_draw;
        if (a.duration > 0 && t0 + a.duration < until)
            until = t0 + a.duration;
        int wait_ms = (int)((until - now) * 1000);
        net_msg_t *msg = NULL;
        int got = net_recv(s, wait_ms > 0 ? (wait_ms < 200 ? wait_ms : 200) : 0, &msg, &err);
        if (got < 0) {
            rc = -1;
            break;
        }
        if (got == 0)
            continue;
        const Quillan__Envelope *env = net_msg_envelope(msg);
        log_record_t rec;
        log_codec_record_view(env->log_record, &rec, fields, MON_FIELDS_MAX);
        if (filter_match(&a, rec.event)) {
            if (a.jsonl)
                jsonl_print(&rec, env->sender_id);
            monitor_ingest(m, &rec, env->sender_id, env->incarnation_id, mon_now());
            if (tb && tensorboard_write_record(tb, &rec, NULL) < 0)
                tb_failures++;
        }
        net_msg_destroy(&msg);
    }
    if (tty && !a.jsonl)
        fputs("\x1b[?25h\x1b[?7h\n", stdout);
    if (rc == 0 && s) {
        net_stats_t st;
        net_socket_stats(s, &st);
        uint64_t garbage = 0;
        for (int r = 0; r < NET_DROP_COUNT; r++)
            garbage += st.dropped[r];
        fprintf(stderr,
                "quillan monitor: %llu records, %llu garbage messages dropped, %llu "
                "disconnects\n",
                (unsigned long long)monitor_records(m), (unsigned long long)garbage,
                (unsigned long long)st.disconnects);
        if (tb)
            fprintf(stderr, "quillan monitor: TensorBoard events in %s (%llu write failures)\n",
                    tensorboard_writer_path(tb), (unsigned long long)tb_failures);
    }
    tensorboard_writer_destroy(&tb);
    net_socket_destroy(&s);
    if (zctx)
        zmq_ctx_term(zctx);
    free(fields);
    monitor_destroy(&m);
    for (size_t i = 0; i < a.n_filters; i++)
        free(a.filters[i]);
    free(a.filters);
    free(a.sets);
    if (rc != 0) {
        fprintf(stderr, "quillan monitor: %s\n", err.msg);
        return 1;
    }
    return 0;
}

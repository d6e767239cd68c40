/* `quillan plot RUN.jsonl -o curves.svg [--metrics a,b,...]`: SVG line charts of a run's
 * metrics over optimizer steps, one panel per metric and one <path> per panel, from the
 * JSON-lines log of the learner (logging.file, its stderr, or `quillan monitor --jsonl`).
 * Points come from `learner.step` records (every field) and `eval` records (their eval/...
 * fields), with x = the record's `step` field; a step logged twice (a resumed run) keeps its
 * last value. Lines that are not JSON objects are skipped and counted. */
#include "cli.h"
#include "error.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PLOT_PANEL_W 520
#define PLOT_PANEL_H 280
#define PLOT_COLUMNS 2
#define PLOT_MARGIN_L 72
#define PLOT_MARGIN_R 20
#define PLOT_MARGIN_T 36
#define PLOT_MARGIN_B 44
#define PLOT_TICKS 5

static const char *const default_metrics[] = {
    "reward/mean",    "eval/accuracy",
    "policy/entropy", "response_length/mean",
    "loss/pg",        "policy/approx_kl",
    "mismatch/kl",    "snapshot/changed_frac",
    "staleness/mean", "perf/rollout_tokens_per_s",
};

static const char *const colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
                                     "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"};

typedef struct {
    double x, y;
    size_t order; /* position in the file, so equal steps keep their last value */
} point_t;

typedef struct {
    char *name;
    point_t *p;
    size_t n, cap;
} series_t;

typedef struct {
    series_t *v;
    size_t n, cap;
} series_set_t;

static series_t *series_get(series_set_t *s, const char *name) {
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->v[i].name, name) == 0)
            return &s->v[i];
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 64;
        series_t *v = realloc(s->v, cap * sizeof *v);
        if (v == NULL)
            return NULL;
        s->v = v;
        s->cap = cap;
    }
    series_t *x = &s->v[s->n];
    memset(x, 0, sizeof *x);
    if ((x->name = strdup(name)) == NULL)
        return NULL;
    s->n++;
    return x;
}

static int series_add(series_t *x, double px, double py, size_t order) {
    if (x->n == x->cap) {
        size_t cap = x->cap ? 2 * x->cap : 256;
        point_t *p = realloc(x->p, cap * sizeof *p);
        if (p == NULL)
            return -1;
        x->p = p;
        x->cap = cap;
    }
    x->p[x->n++] = (point_t){px, py, order};
    return 0;
}

static void series_set_free(series_set_t *s) {
    for (size_t i = 0; i < s->n; i++) {
        free(s->v[i].name);
        free(s->v[i].p);
    }
    free(s->v);
    s->v = NULL;
    s->n = s->cap = 0;
}

static int point_cmp(const void *a, const void *b) {
    const point_t *p = a, *q = b;
    if (p->x != q->x)
        return p->x < q->x ? -1 : 1;
    return p->order < q->order ? -1 : (p->order > q->order);
}

/* Sorts by step and keeps the last value of each step. */
static void series_finish(series_t *x) {
    qsort(x->p, x->n, sizeof *x->p, point_cmp);
    size_t k = 0;
    for (size_t i = 0; i < x->n; i++) {
        if (k > 0 && x->p[k - 1].x == x->p[i].x)
            x->p[k - 1] = x->p[i];
        else
            x->p[k++] = x->p[i];
    }
    x->n = k;
}

/* Reads the log; returns 0 or -1 with err. skipped/first_skipped report non-record lines. */
static int log_read(const char *path, series_set_t *s, size_t *skipped, size_t *first_skipped,
                    qerr_t *err) {
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return qerr_set(err, QERR_IO, "%s: cannot open: %s", path, strerror(errno));
    char *line = NULL;
    size_t cap = 0, lineno = 0, order = 0;
    ssize_t len;
    int rc = 0;
    while (rc == 0 && (len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        if (len == 0)
            continue;
        json_t *rec = json_loadb(line, (size_t)len, 0, NULL);
        const char *event = rec ? json_string_value(json_object_get(rec, "event")) : NULL;
        json_t *fields = rec ? json_object_get(rec, "fields") : NULL;
        if (rec == NULL || !json_is_object(rec) || event == NULL) {
            if ((*skipped)++ == 0)
                *first_skipped = lineno;
            json_decref(rec);
            continue;
        }
        int is_step = strcmp(event, "learner.step") == 0, is_eval = strcmp(event, "eval") == 0;
        json_t *step = json_is_object(fields) ? json_object_get(fields, "step") : NULL;
        if ((is_step || is_eval) && json_is_number(step)) {
            double x = json_number_value(step);
            const char *key;
            json_t *v;
            json_object_foreach(fields, key, v) {
                if (strcmp(key, "step") == 0 || (is_eval && strncmp(key, "eval/", 5) != 0))
                    continue;
                /* null is how the log writes NaN and infinities: a gap in the line */
                double y = json_is_number(v) ? json_number_value(v) : NAN;
                series_t *x_s = series_get(s, key);
                if (x_s == NULL || series_add(x_s, x, y, order++) != 0)
                    rc = qerr_set(err, QERR_NOMEM, "%s: out of memory", path);
            }
        }
        json_decref(rec);
    }
    free(line);
    if (rc == 0 && ferror(f))
        rc = qerr_set(err, QERR_IO, "%s: read error", path);
    fclose(f);
    for (size_t i = 0; rc == 0 && i < s->n; i++)
        series_finish(&s->v[i]);
    return rc;
}

/* A "nice" tick step (1, 2 or 5 times a power of ten) for span over about n ticks. */
static double nice_step(double span, int n) {
    double raw = span / n;
    double p = pow(10, floor(log10(raw)));
    double f = raw / p;
    return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * p;
}

static void xml_text(FILE *f, const char *s) {
    for (; *s; s++) {
        switch (*s) {
        case '&': fputs("&amp;", f); break;
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '"': fputs("&quot;", f); break;
        default: fputc(*s, f);
        }
    }
}

static void tick_label(char *buf, size_t cap, double v, double step) {
    if (fabs(v) < step * 1e-9)
        v = 0;
    if (fabs(v) >= 1e5 || (v != 0 && fabs(v) < 1e-3))
        snprintf(buf, cap, "%.2g", v);
    else
        snprintf(buf, cap, "%.*f", step >= 1 ? 0 : (int)ceil(-log10(step)), v);
}

static void panel_write(FILE *f, const series_t *x, int col, int row, const char *color) {
    const double ox = col * PLOT_PANEL_W, oy = row * PLOT_PANEL_H;
    const double l = ox + PLOT_MARGIN_L, r = ox + PLOT_PANEL_W - PLOT_MARGIN_R;
    const double t = oy + PLOT_MARGIN_T, b = oy + PLOT_PANEL_H - PLOT_MARGIN_B;
    double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
    for (size_t i = 0; i < x->n; i++) {
        x0 = fmin(x0, x->p[i].x);
        x1 = fmax(x1, x->p[i].x);
        if (isfinite(x->p[i].y)) {
            y0 = fmin(y0, x->p[i].y);
            y1 = fmax(y1, x->p[i].y);
        }
    }
    if (!isfinite(y0)) { /* no finite value at all: an empty panel with a unit range */
        y0 = 0;
        y1 = 1;
    }
    if (y1 - y0 < 1e-12 * fmax(1, fabs(y0))) { /* a constant: centre it */
        y0 -= 0.5;
        y1 += 0.5;
    }
    if (x1 <= x0) {
        x0 -= 0.5;
        x1 += 0.5;
    }
    const double ys = nice_step(y1 - y0, PLOT_TICKS), xs = nice_step(x1 - x0, PLOT_TICKS);
    y0 = floor(y0 / ys) * ys;
    y1 = ceil(y1 / ys) * ys;
    fprintf(f,
            "<g class=\"panel\">\n<text x=\"%.1f\" y=\"%.1f\" font-size=\"15\" "
            "font-weight=\"bold\">",
            l, oy + 22);
    xml_text(f, x->name);
    fprintf(f, "</text>\n");
    fprintf(f,
            "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" "
            "stroke=\"#999\"/>\n",
            l, t, r - l, b - t);
    char lab[64];
    for (double v = y0; v <= y1 + ys * 1e-6; v += ys) {
        double py = b - (v - y0) / (y1 - y0) * (b - t);
        tick_label(lab, sizeof lab, v, ys);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e5e5e5\"/>\n",
                l, py, r, py);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" text-anchor=\"end\">%s</text>\n",
                l - 6, py + 4, lab);
    }
    for (double v = ceil(x0 / xs) * xs; v <= x1 + xs * 1e-6; v += xs) {
        double px = l + (v - x0) / (x1 - x0) * (r - l);
        tick_label(lab, sizeof lab, v, xs);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#999\"/>\n", px,
                b, px, b + 5);
        fprintf(f,
                "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" text-anchor=\"middle\">%s</text>\n",
                px, b + 18, lab);
    }
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\" text-anchor=\"middle\">step</text>\n",
            (l + r) / 2, b + 36);
    fprintf(f, "<path fill=\"none\" stroke=\"%s\" stroke-width=\"1.8\" d=\"", color);
    int pen = 0;
    for (size_t i = 0; i < x->n; i++) {
        if (!isfinite(x->p[i].y)) {
            pen = 0;
            continue;
        }
        double px = l + (x->p[i].x - x0) / (x1 - x0) * (r - l);
        double py = b - (x->p[i].y - y0) / (y1 - y0) * (b - t);
        fprintf(f, "%s%.2f %.2f ", pen ? "L" : "M", px, py);
        pen = 1;
    }
    fprintf(f, "\"/>\n</g>\n");
}

static int svg_write(const char *path, series_t *const *panels, size_t n, const char *title,
                     qerr_t *err) {
    FILE *f = fopen(path, "w");
    if (f == NULL)
        return qerr_set(err, QERR_IO, "%s: cannot create: %s", path, strerror(errno));
    const int cols = n < PLOT_COLUMNS ? (int)n : PLOT_COLUMNS;
    const int rows = (int)((n + PLOT_COLUMNS - 1) / PLOT_COLUMNS);
    const int w = cols * PLOT_PANEL_W, h = rows * PLOT_PANEL_H + 30;
    fprintf(f,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
            "viewBox=\"0 0 %d %d\" font-family=\"DejaVu Sans, Helvetica, Arial, "
            "sans-serif\">\n"
            "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
            "<text x=\"12\" y=\"22\" font-size=\"14\" fill=\"#555\">",
            w, h, w, h);
    xml_text(f, title);
    fprintf(f, "</text>\n<g transform=\"translate(0,30)\">\n");
    for (size_t i = 0; i < n; i++)
        panel_write(f, panels[i], (int)(i % PLOT_COLUMNS), (int)(i / PLOT_COLUMNS),
                    colors[i % (sizeof colors / sizeof colors[0])]);
    fprintf(f, "</g>\n</svg>\n");
    int bad = ferror(f);
    if (fclose(f) != 0 || bad)
        return qerr_set(err, QERR_IO, "%s: write failed", path);
    return 0;
}

static void plot_usage(FILE *out) {
    fprintf(out, "usage: quillan plot RUN.jsonl -o OUT.svg [--metrics NAME,...]\n"
                 "\n"
                 "Draws SVG line charts of a run's metrics over optimizer steps: one panel per\n"
                 "metric. RUN.jsonl is a JSON-lines log of the learner (logging.file, its\n"
                 "stderr, or `quillan monitor --jsonl`); the points are its learner.step and\n"
                 "eval records. Lines that are not log records are skipped.\n"
                 "\n"
                 "options:\n"
                 "  -o, --output FILE  the SVG to write (required)\n"
                 "  --metrics A,B,...  metrics to draw (default: those of reward/mean,\n"
                 "                     eval/accuracy, policy/entropy, response_length/mean,\n"
                 "                     loss/pg, policy/approx_kl, mismatch/kl,\n"
                 "                     snapshot/changed_frac, staleness/mean,\n"
                 "                     perf/rollout_tokens_per_s found in the log)\n"
                 "  --help             this text\n");
}

int cli_plot_main(int argc, char **argv) {
    const char *in = NULL, *out = NULL, *metrics = NULL;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) {
            plot_usage(stdout);
            return 0;
        }
        if (!strcmp(o, "-o") || !strcmp(o, "--output") || !strcmp(o, "--metrics")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "quillan plot: %s needs a value\n", o);
                return 2;
            }
            if (!strcmp(o, "--metrics"))
                metrics = argv[++i];
            else
                out = argv[++i];
        } else if (o[0] == '-' && o[1] != '\0') {
            fprintf(stderr, "quillan plot: unknown option '%s'\n", o);
            return 2;
        } else if (in) {
            fprintf(stderr, "quillan plot: more than one log ('%s', '%s')\n", in, o);
            return 2;
        } else {
            in = o;
        }
    }
    if (in == NULL || out == NULL) {
        plot_usage(stderr);
        return 2;
    }
    series_set_t s = {0};
    qerr_t err = {0};
    size_t skipped = 0, first_skipped = 0;
    if (log_read(in, &s, &skipped, &first_skipped, &err) != 0) {
        fprintf(stderr, "quillan plot: %s\n", err.msg);
        series_set_free(&s);
        return 1;
    }
    if (skipped)
        fprintf(stderr,
                "quillan plot: %s: skipped %zu lines that are not log records (first: "
                "line %zu)\n",
                in, skipped, first_skipped);
    series_t **panels =
        calloc(s.n + sizeof default_metrics / sizeof default_metrics[0] + 1, sizeof *panels);
    size_t n = 0;
    int rc = panels ? 0 : 1;
    if (rc == 0 && metrics) {
        for (const char *p = metrics; *p && rc == 0;) {
            const char *e = strchr(p, ',');
            size_t len = e ? (size_t)(e - p) : strlen(p);
            series_t *found = NULL;
            for (size_t i = 0; i < s.n && len; i++)
                if (strlen(s.v[i].name) == len && strncmp(s.v[i].name, p, len) == 0)
                    found = &s.v[i];
            if (len && found == NULL) {
                fprintf(stderr,
                        "quillan plot: %s: no metric '%.*s' in learner.step or eval "
                        "records; there are:",
                        in, (int)len, p);
                for (size_t i = 0; i < s.n; i++)
                    fprintf(stderr, " %s", s.v[i].name);
                fprintf(stderr, "%s\n", s.n ? "" : " none");
                rc = 1;
            } else if (found) {
                int dup = 0;
                for (size_t i = 0; i < n; i++)
                    dup |= panels[i] == found;
                if (!dup)
                    panels[n++] = found;
            }
            p += len + (e ? 1 : 0);
        }
    } else if (rc == 0) {
        for (size_t k = 0; k < sizeof default_metrics / sizeof default_metrics[0]; k++)
            for (size_t i = 0; i < s.n; i++)
                if (strcmp(s.v[i].name, default_metrics[k]) == 0)
                    panels[n++] = &s.v[i];
    }
    if (rc == 0 && n == 0) {
        fprintf(stderr,
                "quillan plot: %s: no metrics to draw (no learner.step or eval records "
                "with a step field%s)\n",
                in, metrics ? "" : " among the default metrics; try --metrics");
        rc = 1;
    }
    if (rc == 0) {
        const char *base = strrchr(in, '/');
        if (svg_write(out, panels, n, base ? base + 1 : in, &err) != 0) {
            fprintf(stderr, "quillan plot: %s\n", err.msg);
            rc = 1;
        } else {
            printf("wrote %s: %zu panels\n", out, n);
        }
    }
    free(panels);
    series_set_free(&s);
    return rc;
}

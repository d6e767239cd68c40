#define PCRE2_CODE_UNIT_WIDTH 8
#include "scorers.h"

#include "json.h"

#include <ctype.h>
#include <math.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Longest number the extractor copies for strtod; longer digit runs are not numbers a task
 * answer would have, and are skipped. */
#define NUMBER_MAX 128

struct reward_scorers {
    config_reward_builtin_t cfg;
    pcre2_code *re; /* NULL when format is off */
};

/* ---- metadata ---- */

int reward_metadata_text(const reward_kv_t *md, size_t n, const char *key, char **out,
                         qerr_t *err) {
    *out = NULL;
    const char *raw = NULL;
    for (size_t i = 0; i < n && raw == NULL; i++)
        if (strcmp(md[i].key, key) == 0)
            raw = md[i].value;
    if (raw == NULL)
        return 0;
    char what[CONFIG_NAME_MAX + 16];
    snprintf(what, sizeof what, "metadata '%s'", key);
    json_t *v = qjson_parse(raw, strlen(raw), what, err);
    if (v == NULL)
        return -1;
    int rc = 1;
    if (json_is_null(v)) {
        rc = 0;
    } else if (json_is_string(v)) {
        *out = strdup(json_string_value(v));
    } else if (json_is_number(v) || json_is_boolean(v)) {
        /* The text as written, not re-encoded: "1.50" must stay "1.50" for exact match. */
        size_t a = strspn(raw, " \t\r\n"), b = strlen(raw);
        while (b > a && isspace((unsigned char)raw[b - 1]))
            b--;
        *out = strndup(raw + a, b - a);
    } else {
        rc = qerr_set(err, QERR_INVALID, "metadata '%s' is %s, expected a string or number", key,
                      qjson_type_name(v));
    }
    json_decref(v);
    if (rc == 1 && *out == NULL)
        return qerr_set(err, QERR_NOMEM, "metadata '%s': out of memory", key);
    return rc;
}

/* ---- exact ---- */

/* Narrows [*a, *b) of s to the normalised text: trailing eos copies and whitespace removed
 * (repeatedly, so "x<eos>\n<eos>" becomes "x"), leading whitespace removed. */
static void normalise(const char *s, const char *eos, size_t *a, size_t *b) {
    size_t lo = 0, hi = strlen(s), ne = eos ? strlen(eos) : 0;
    for (;;) {
        size_t before = hi;
        while (hi > lo && isspace((unsigned char)s[hi - 1]))
            hi--;
        if (ne > 0 && hi - lo >= ne && memcmp(s + hi - ne, eos, ne) == 0)
            hi -= ne;
        if (hi == before)
            break;
    }
    while (lo < hi && isspace((unsigned char)s[lo]))
        lo++;
    *a = lo;
    *b = hi;
}

reward_score_t reward_score_exact(const char *completion, const char *answer,
                                  const char *eos_text) {
    if (answer == NULL)
        return (reward_score_t){.has = false};
    size_t ca, cb, aa, ab;
    normalise(completion, eos_text, &ca, &cb);
    normalise(answer, eos_text, &aa, &ab);
    int same = cb - ca == ab - aa && memcmp(completion + ca, answer + aa, cb - ca) == 0;
    return (reward_score_t){.has = true, .value = same ? 1.0 : 0.0};
}

/* ---- numbers ---- */

/* Scans one number starting at s[i] (a digit, or '.' before a digit). Copies it without
 * thousands separators into buf and returns the index just past it. */
static size_t number_scan(const char *s, size_t i, char *buf, size_t cap, size_t *blen) {
    size_t n = 0;
#define PUT(c)                                                                                     \
    do {                                                                                           \
        if (n + 1 < cap)                                                                           \
            buf[n] = (c);                                                                          \
        n++;                                                                                       \
    } while (0)
    while (isdigit((unsigned char)s[i]) ||
           (s[i] == ',' && i > 0 && isdigit((unsigned char)s[i - 1]) &&
            isdigit((unsigned char)s[i + 1]) && isdigit((unsigned char)s[i + 2]) &&
            isdigit((unsigned char)s[i + 3]) && !isdigit((unsigned char)s[i + 4]))) {
        if (s[i] != ',')
            PUT(s[i]);
        i++;
    }
    if (s[i] == '.' && isdigit((unsigned char)s[i + 1])) {
        PUT('.');
        i++;
        while (isdigit((unsigned char)s[i]))
            PUT(s[i++]);
    }
    if (s[i] == 'e' || s[i] == 'E') {
        size_t j = i + 1;
        if (s[j] == '+' || s[j] == '-')
            j++;
        if (isdigit((unsigned char)s[j])) {
            for (; i < j; i++)
                PUT(s[i]);
            while (isdigit((unsigned char)s[i]))
                PUT(s[i++]);
        }
    }
#undef PUT
    *blen = n;
    return i;
}

static int number_at(const char *s, size_t start, size_t *end, double *out) {
    char buf[NUMBER_MAX + 2];
    size_t i = start, n = 0;
    int neg = 0;
    if (s[i] == '-') {
        neg = 1;
        i++;
    }
    size_t blen;
    *end = number_scan(s, i, buf + 1, sizeof buf - 1, &blen);
    if (blen + 1 >= sizeof buf - 1)
        return 0;
    buf[0] = neg ? '-' : '+';
    n = blen + 1;
    buf[n] = '\0';
    char *stop;
    double v = strtod(buf, &stop);
    if (stop != buf + n || !isfinite(v))
        return 0;
    *out = v;
    return 1;
}

static int starts_number(const char *s, size_t i) {
    return isdigit((unsigned char)s[i]) || (s[i] == '.' && isdigit((unsigned char)s[i + 1]));
}

int reward_number_last(const char *text, double *out) {
    int found = 0;
    size_t i = 0;
    while (text[i]) {
        if (!starts_number(text, i)) {
            i++;
            continue;
        }
        size_t start = i;
        /* A '-' right before is a sign unless it follows a word or number ("3-4", "x-1"). */
        if (i > 0 && text[i - 1] == '-' && (i < 2 || !isalnum((unsigned char)text[i - 2])))
            start = i - 1;
        size_t end;
        double v;
        if (number_at(text, start, &end, &v)) {
            *out = v;
            found = 1;
        }
        i = end > i ? end : i + 1;
    }
    return found;
}

int reward_number_parse(const char *text, double *out) {
    size_t i = strspn(text, " \t\r\n");
    size_t start = i;
    if (text[i] == '+' || text[i] == '-')
        i++;
    if (!starts_number(text, i))
        return 0;
    size_t end;
    double v;
    if (text[start] == '+')
        start++;
    if (!number_at(text, start, &end, &v))
        return 0;
    end += strspn(text + end, " \t\r\n");
    if (text[end] != '\0')
        return 0;
    *out = v;
    return 1;
}

reward_score_t reward_score_numeric(const char *completion, const char *answer, double abs_tol,
                                    double rel_tol) {
    double want, got;
    if (answer == NULL || !reward_number_parse(answer, &want))
        return (reward_score_t){.has = false};
    if (!reward_number_last(completion, &got))
        return (reward_score_t){.has = true, .value = 0.0};
    double tol = fmax(abs_tol, rel_tol * fabs(want));
    return (reward_score_t){.has = true, .value = fabs(got - want) <= tol ? 1.0 : 0.0};
}

/* ---- length ---- */

reward_score_t reward_score_length(size_t len, int target, int window) {
    Q_ASSERT(target >= 0 && window >= 0);
    if (len <= (size_t)target)
        return (reward_score_t){.has = true, .value = 0.0};
    size_t over = len - (size_t)target;
    if (window == 0 || over >= (size_t)window)
        return (reward_score_t){.has = true, .value = -1.0};
    return (reward_score_t){.has = true, .value = -(double)over / (double)window};
}

/* ---- the combination ---- */

reward_scorers_t *reward_scorers_new(const config_reward_builtin_t *cfg, qerr_t *err) {
    Q_ASSERT(cfg);
    if (cfg->exact_weight == 0 && cfg->numeric_weight == 0 && cfg->format_weight == 0 &&
        cfg->length_weight == 0) {
        qerr_set(err, QERR_INVALID,
                 "reward.builtin: every scorer weight is 0 (set reward.builtin.exact.weight, "
                 "numeric.weight, format.weight or length.weight)");
        return NULL;
    }
    if (cfg->answer_key[0] == '\0' && (cfg->exact_weight != 0 || cfg->numeric_weight != 0)) {
        qerr_set(err, QERR_INVALID, "reward.builtin.answer_key: empty, yet exact or numeric is on");
        return NULL;
    }
    reward_scorers_t *s = calloc(1, sizeof *s);
    if (s == NULL) {
        qerr_set(err, QERR_NOMEM, "reward scorers: out of memory");
        return NULL;
    }
    s->cfg = *cfg;
    if (cfg->format_weight != 0) {
        if (cfg->format_regex[0] == '\0') {
            qerr_set(err, QERR_INVALID,
                     "reward.builtin.format.regex: empty, yet reward.builtin.format.weight is %g",
                     cfg->format_weight);
            reward_scorers_destroy(&s);
            return NULL;
        }
        int code;
        PCRE2_SIZE off;
        s->re = pcre2_compile((PCRE2_SPTR)cfg->format_regex, PCRE2_ZERO_TERMINATED, PCRE2_UTF,
                              &code, &off, NULL);
        if (s->re == NULL) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(code, msg, sizeof msg);
            qerr_set(err, QERR_INVALID, "reward.builtin.format.regex: %s at offset %zu",
                     (const char *)msg, (size_t)off);
            reward_scorers_destroy(&s);
            return NULL;
        }
    }
    return s;
}

void reward_scorers_destroy(reward_scorers_t **sp) {
    if (sp == NULL || *sp == NULL)
        return;
    pcre2_code_free((*sp)->re);
    free(*sp);
    *sp = NULL;
}

int reward_scorers_format_match(const reward_scorers_t *s, const char *text, size_t len,
                                qerr_t *err) {
    Q_ASSERT(s->re);
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(s->re, NULL);
    if (md == NULL)
        return qerr_set(err, QERR_NOMEM, "reward.builtin.format.regex: out of memory");
    /* The text was checked as UTF-8 by the wire codec; PCRE2_NO_UTF_CHECK is still not used
     * because in-process callers may pass anything. */
    int rc = pcre2_match(s->re, (PCRE2_SPTR)text, len, 0, 0, md, NULL);
    pcre2_match_data_free(md);
    if (rc >= 0)
        return 1;
    if (rc == PCRE2_ERROR_NOMATCH)
        return 0;
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(rc, msg, sizeof msg);
    return qerr_set(err, QERR_INVALID, "reward.builtin.format.regex: matching failed: %s",
                    (const char *)msg);
}

/* Appends "name=value" (or "name=none") to detail. */
static void detail_add(char *d, size_t cap, const char *name, reward_score_t sc) {
    if (d == NULL)
        return;
    size_t n = strlen(d);
    if (n >= cap)
        return;
    if (sc.has)
        snprintf(d + n, cap - n, "%s%s=%g", n ? " " : "", name, sc.value);
    else
        snprintf(d + n, cap - n, "%s%s=none", n ? " " : "", name);
}

/* Scores one sample; answer is the decoded answer or NULL, why says why it is NULL. */
static int sample_score(const reward_scorers_t *s, const reward_sample_t *x, const char *answer,
                        const char *why, reward_score_t *out, char *d, size_t cap, qerr_t *err) {
    const config_reward_builtin_t *c = &s->cfg;
    double total = 0;
    bool has = true;
    if (d)
        d[0] = '\0';
    if (c->exact_weight != 0) {
        reward_score_t sc = reward_score_exact(x->completion, answer, c->eos_text);
        detail_add(d, cap, "exact", sc);
        has = has && sc.has;
        total += c->exact_weight * sc.value;
    }
    if (c->numeric_weight != 0) {
        reward_score_t sc =
            reward_score_numeric(x->completion, answer, c->numeric_abs_tol, c->numeric_rel_tol);
        detail_add(d, cap, "numeric", sc);
        has = has && sc.has;
        total += c->numeric_weight * sc.value;
    }
    if (c->format_weight != 0) {
        int m = reward_scorers_format_match(s, x->completion, strlen(x->completion), err);
        if (m < 0)
            return -1;
        reward_score_t sc = {.has = true, .value = m};
        detail_add(d, cap, "format", sc);
        total += c->format_weight * sc.value;
    }
    if (c->length_weight != 0) {
        size_t len =
            c->length_unit == CONFIG_LENGTH_TOKENS ? x->n_completion_tokens : strlen(x->completion);
        reward_score_t sc = reward_score_length(len, c->length_target, c->length_window);
        detail_add(d, cap, "length", sc);
        total += c->length_weight * sc.value;
    }
    if (!has && d && why) {
        size_t n = strlen(d);
        if (n < cap)
            snprintf(d + n, cap - n, " (no reward: %s)", why);
    }
    *out = (reward_score_t){.has = has, .value = has ? total : 0.0};
    return 0;
}

int reward_scorers_score(const reward_scorers_t *s, const reward_batch_t *batch,
                         reward_score_t *out, char *detail, size_t detail_cap, qerr_t *err) {
    Q_ASSERT(s && batch && out);
    Q_ASSERT(detail == NULL || detail_cap > 0);
    char *answer = NULL;
    char why[QERR_MSG_MAX + 64] = "";
    int need_answer = s->cfg.exact_weight != 0 || s->cfg.numeric_weight != 0;
    if (need_answer) {
        qerr_t e;
        qerr_clear(&e);
        int rc = reward_metadata_text(batch->metadata, batch->n_metadata, s->cfg.answer_key,
                                      &answer, &e);
        if (rc == 0)
            snprintf(why, sizeof why, "metadata has no '%s'", s->cfg.answer_key);
        else if (rc < 0 && e.code == QERR_NOMEM)
            return qerr_set(err, QERR_NOMEM, "%s", e.msg);
        else if (rc < 0)
            snprintf(why, sizeof why, "%s", e.msg);
    }
    int rc = 0;
    for (size_t i = 0; i < batch->n_samples && rc == 0; i++)
        rc = sample_score(s, &batch->samples[i], answer, why[0] ? why : NULL, &out[i],
                          detail ? detail + i * detail_cap : NULL, detail_cap, err);
    free(answer);
    return rc;
}

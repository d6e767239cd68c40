#include "config.h"

#include "config_schema.h"
#include "diffusion.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <yaml.h>

#define KEY_MAX 256            /* longest dotted key path, "reward.services[15].address" included */
#define GOT_MAX 48             /* bytes of an offending value quoted in a message */
#define GOT_BUF (GOT_MAX + 24) /* the quoted value with "the string ..." around it */
#define SET_MAX 300            /* bytes of a --set assignment quoted in a message */
#define SET_ORIGIN -1

/* One YAML document being applied to a config: a file, a --set value, or a schema default. */
typedef struct {
    quillan_config_t *cfg;
    yaml_document_t *doc;
    const char *file;          /* file path (messages get file:line), or NULL */
    const char *where;         /* without a file: "--set a.b=c" or "default of a.b" */
    int pass;                  /* 0: model.preset only; 1: every other key (presets apply first) */
    int seen[CONFIG_KEYS_MAX]; /* line at which each row was set by this document (duplicates) */
    qerr_t *err;
} loader_t;

/* ---- small helpers ---- */

/* Copies src into dst[cap], truncating; dst is always terminated. */
static void copy_str(char *dst, size_t cap, const char *src) {
    size_t n = strnlen(src, cap - 1);
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static void *field_at(void *base, const config_key_t *k) {
    return (char *)base + k->offset;
}
static const void *cfield_at(const void *base, const config_key_t *k) {
    return (const char *)base + k->offset;
}

static const config_key_t *schema_row(int i) {
    size_t n;
    const config_key_t *rows = config_schema(&n);
    Q_ASSERT(i >= 0 && (size_t)i < n);
    return &rows[i];
}

static int line_of(const yaml_node_t *node) {
    return (int)node->start_mark.line + 1;
}

static const char *scalar_of(const yaml_node_t *node) {
    return node->type == YAML_SCALAR_NODE ? (const char *)node->data.scalar.value : NULL;
}

static int is_plain(const yaml_node_t *node) {
    return node->type == YAML_SCALAR_NODE && node->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
}

static int is_null(const yaml_node_t *node) {
    if (!is_plain(node))
        return 0;
    const char *s = scalar_of(node);
    return !*s || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") || !strcmp(s, "NULL");
}

/* "'abc'", "a mapping", "a list" or "null": what the user wrote, for "got ..." messages. */
static const char *describe(const yaml_node_t *node, char *buf, size_t cap) {
    if (node->type == YAML_MAPPING_NODE)
        return "a mapping";
    if (node->type == YAML_SEQUENCE_NODE)
        return "a list";
    if (is_null(node))
        return "null";
    const char *s = scalar_of(node), *kind = is_plain(node) ? "" : "the string ";
    if (strlen(s) > GOT_MAX)
        snprintf(buf, cap, "%s'%.*s...'", kind, GOT_MAX, s);
    else
        snprintf(buf, cap, "%s'%s'", kind, s);
    return buf;
}

static int join_path(char *out, const char *prefix, const char *key) {
    int n =
        *prefix ? snprintf(out, KEY_MAX, "%s.%s", prefix, key) : snprintf(out, KEY_MAX, "%s", key);
    return n < 0 || n >= KEY_MAX ? -1 : 0;
}

/* Fails with "<file>:<line>: <key>: <message>" or "<where>: <key>: <message>". */
static int fail(loader_t *ld, int line, qerr_code_t code, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static int fail(loader_t *ld, int line, qerr_code_t code, const char *key, const char *fmt, ...) {
    char msg[QERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (ld->file)
        return qerr_set(ld->err, code, "%s:%d: %s: %s", ld->file, line, key, msg);
    return qerr_set(ld->err, code, "%s: %s: %s", ld->where, key, msg);
}

static size_t edit_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la >= KEY_MAX || lb >= KEY_MAX)
        return (size_t)-1;
    size_t row[KEY_MAX + 1];
    for (size_t j = 0; j <= lb; j++)
        row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

/* Closest known key path (a row or any of its dotted prefixes) to an unknown one, or NULL when
 * nothing is close enough to be a likely typo. */
static const char *closest_key(const char *path, const config_key_t *rows, size_t n, char *buf) {
    size_t best = (size_t)-1;
    size_t limit = strlen(path) / 3 > 2 ? strlen(path) / 3 : 2;
    for (size_t i = 0; i < n; i++) {
        char cand[KEY_MAX];
        copy_str(cand, sizeof cand, rows[i].path);
        for (;;) {
            size_t d = edit_distance(path, cand);
            if (d <= limit && d < best) {
                best = d;
                snprintf(buf, KEY_MAX, "%s", cand);
            }
            char *dot = strrchr(cand, '.');
            if (!dot)
                break;
            *dot = '\0';
        }
    }
    return best == (size_t)-1 ? NULL : buf;
}

static int unknown_key(loader_t *ld, int line, const char *path, const config_key_t *rows,
                       size_t n) {
    char buf[KEY_MAX];
    const char *near = closest_key(path, rows, n, buf);
    if (near)
        return fail(ld, line, QERR_INVALID, path, "unknown key (did you mean '%s'?)", near);
    return fail(ld, line, QERR_INVALID, path, "unknown key");
}

/* True when path is a dotted prefix of some row (a section or nested group). */
static int is_group(const char *path, const config_key_t *rows, size_t n) {
    size_t len = strlen(path);
    for (size_t i = 0; i < n; i++)
        if (!strncmp(rows[i].path, path, len) && rows[i].path[len] == '.')
            return 1;
    return 0;
}

static int find_row(const char *path, const config_key_t *rows, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!strcmp(rows[i].path, path))
            return (int)i;
    return -1;
}

/* ---- scalar parsing ---- */

static int parse_number(loader_t *ld, int line, const char *key, const yaml_node_t *v,
                        const config_key_t *k, double *out) {
    char got[GOT_BUF];
    const char *s = scalar_of(v);
    char *end;
    errno = 0;
    double x = s && is_plain(v) && *s ? strtod(s, &end) : 0;
    if (!s || !is_plain(v) || !*s || *end || errno == ERANGE)
        return fail(ld, line, QERR_INVALID, key, "expected a number, got %s",
                    describe(v, got, sizeof got));
    if (!isfinite(x))
        return fail(ld, line, QERR_RANGE, key, "%s is not a finite number", s);
    if (x < k->min || (k->min_open && x == k->min) || x > k->max)
        return fail(ld, line, QERR_RANGE, key, "%s is out of range %c%g, %g]", s,
                    k->min_open ? '(' : '[', k->min, k->max);
    *out = x;
    return 0;
}

static int parse_int(loader_t *ld, int line, const char *key, const yaml_node_t *v,
                     const config_key_t *k, int *out) {
    char got[GOT_BUF];
    const char *s = scalar_of(v);
    char *end;
    errno = 0;
    long long x = s && is_plain(v) && *s ? strtoll(s, &end, 10) : 0;
    if (!s || !is_plain(v) || !*s || *end)
        return fail(ld, line, QERR_INVALID, key, "expected an integer, got %s",
                    describe(v, got, sizeof got));
    if (errno == ERANGE || (double)x < k->min || (double)x > k->max)
        return fail(ld, line, QERR_RANGE, key, "%s is out of range [%.0f, %.0f]", s, k->min,
                    k->max);
    *out = (int)x;
    return 0;
}

static int parse_u64(loader_t *ld, int line, const char *key, const yaml_node_t *v, uint64_t *out) {
    char got[GOT_BUF];
    const char *s = scalar_of(v);
    if (!s || !is_plain(v) || !*s || strspn(s, "0123456789") != strlen(s))
        return fail(ld, line, QERR_INVALID, key, "expected an unsigned integer, got %s",
                    describe(v, got, sizeof got));
    errno = 0;
    unsigned long long x = strtoull(s, NULL, 10);
    if (errno == ERANGE)
        return fail(ld, line, QERR_RANGE, key, "%s is out of range [0, %llu]", s,
                    (unsigned long long)UINT64_MAX);
    *out = (uint64_t)x;
    return 0;
}

static int parse_bool(loader_t *ld, int line, const char *key, const yaml_node_t *v, bool *out) {
    static const char *const yes[] = {"true", "yes", "on"}, *const no[] = {"false", "no", "off"};
    const char *s = is_plain(v) ? scalar_of(v) : NULL;
    for (size_t i = 0; s && i < 3; i++) {
        if (!strcasecmp(s, yes[i]) || !strcasecmp(s, no[i])) {
            *out = !strcasecmp(s, yes[i]);
            return 0;
        }
    }
    char got[GOT_BUF];
    return fail(ld, line, QERR_INVALID, key, "expected true or false, got %s",
                describe(v, got, sizeof got));
}

static int parse_string(loader_t *ld, int line, const char *key, const yaml_node_t *v,
                        const config_key_t *k, char *out) {
    char got[GOT_BUF];
    if (v->type != YAML_SCALAR_NODE)
        return fail(ld, line, QERR_INVALID, key, "expected a string, got %s",
                    describe(v, got, sizeof got));
    const char *s = is_null(v) ? "" : scalar_of(v);
    size_t n = is_null(v) ? 0 : v->data.scalar.length;
    if (strlen(s) != n)
        return fail(ld, line, QERR_INVALID, key, "string contains a NUL byte");
    if (n >= k->size)
        return fail(ld, line, QERR_RANGE, key,
                    "string of %zu bytes is longer than the limit of %zu", n, k->size - 1);
    memcpy(out, s, n + 1);
    return 0;
}

static int parse_enum(loader_t *ld, int line, const char *key, const yaml_node_t *v,
                      const char *const *names, int *out) {
    const char *s = scalar_of(v);
    for (int i = 0; s && names[i]; i++) {
        if (!strcmp(s, names[i])) {
            *out = i;
            return 0;
        }
    }
    char list[256] = "", got[GOT_BUF];
    for (int i = 0; names[i]; i++) {
        size_t used = strlen(list);
        snprintf(list + used, sizeof list - used, "%s%s", i ? ", " : "", names[i]);
    }
    return fail(ld, line, QERR_INVALID, key, "expected one of %s, got %s", list,
                describe(v, got, sizeof got));
}

static int parse_range(loader_t *ld, int line, const char *key, const yaml_node_t *v,
                       const config_key_t *k, config_range_t *out) {
    if (is_null(v)) {
        *out = (config_range_t){0};
        return 0;
    }
    char got[GOT_BUF];
    if (v->type != YAML_SEQUENCE_NODE ||
        v->data.sequence.items.top - v->data.sequence.items.start != 2)
        return fail(ld, line, QERR_INVALID, key, "expected [lo, hi] or null, got %s",
                    describe(v, got, sizeof got));
    double x[2];
    for (int i = 0; i < 2; i++) {
        yaml_node_t *item = yaml_document_get_node(ld->doc, v->data.sequence.items.start[i]);
        if (parse_number(ld, line, key, item, k, &x[i]))
            return -1;
    }
    if (x[0] > x[1])
        return fail(ld, line, QERR_RANGE, key, "lo %g is above hi %g", x[0], x[1]);
    *out = (config_range_t){.enabled = true, .lo = x[0], .hi = x[1]};
    return 0;
}

/* ---- presets ---- */

/* Replaces the model section with preset `name`, keeping every model key set explicitly. */
static int apply_preset(quillan_config_t *cfg, const char *name, qerr_t *err) {
    model_config_t saved = cfg->model;
    if (model_config_preset(name, &cfg->model, err))
        return -1;
    size_t n;
    const config_key_t *rows = config_schema(&n);
    for (size_t i = 0; i < n; i++) {
        const config_key_t *k = &rows[i];
        if (cfg->origin[i] != 0 && k->type != CONFIG_T_PRESET && !strncmp(k->path, "model.", 6))
            memcpy(field_at(cfg, k),
                   (const char *)&saved + (k->offset - offsetof(quillan_config_t, model)), k->size);
    }
    copy_str(cfg->model_preset, sizeof cfg->model_preset, name);
    return 0;
}

/* ---- applying nodes ---- */

static int walk_mapping(loader_t *ld, const yaml_node_t *map, const char *prefix,
                        const char *shown_prefix, const config_key_t *rows, size_t n, void *base,
                        int is_item);
static int apply_value(loader_t *ld, const config_key_t *k, const yaml_node_t *v, void *base,
                       const char *key, int line);

static int parse_text(const char *text, yaml_document_t *doc, const char *where, qerr_t *err);

/* Applies row k's schema default to base; a bad default is a bug in the table. */
static void apply_default(quillan_config_t *cfg, const config_key_t *k, const char *where,
                          void *base) {
    yaml_document_t doc;
    qerr_t err = {0};
    /* An empty default is the empty string; YAML reads "" as no document at all. */
    int rc = parse_text(*k->def ? k->def : "''", &doc, where, &err);
    if (rc == 0) {
        loader_t ld = {.cfg = cfg, .doc = &doc, .where = where, .err = &err};
        rc = apply_value(&ld, k, yaml_document_get_root_node(&doc), base, k->path, 0);
        yaml_document_delete(&doc);
    }
    if (rc)
        fprintf(stderr, "quillan: bad schema default: %s\n", err.msg);
    Q_ASSERT(rc == 0);
}

/* Sets every field of a list item to its schema default. */
static void item_defaults(const config_key_t *list, void *item) {
    memset(item, 0, list->item_size);
    for (size_t i = 0; i < list->n_item_keys; i++) {
        char where[KEY_MAX + 16];
        snprintf(where, sizeof where, "default of %s[].%s", list->path, list->item_keys[i].path);
        apply_default(NULL, &list->item_keys[i], where, item);
    }
}

/* Fills one list item from a mapping node: defaults first, then the node's keys. */
static int apply_item(loader_t *ld, const config_key_t *list, const yaml_node_t *v, void *item,
                      const char *shown, int line) {
    char got[GOT_BUF];
    if (v->type != YAML_MAPPING_NODE)
        return fail(ld, line, QERR_INVALID, shown, "expected a mapping of %s, got %s", list->doc,
                    describe(v, got, sizeof got));
    item_defaults(list, item);
    if (walk_mapping(ld, v, "", shown, list->item_keys, list->n_item_keys, item, 1))
        return -1;
    for (size_t i = 0; i < list->n_item_keys; i++) {
        const config_key_t *k = &list->item_keys[i];
        if (k->required && k->type == CONFIG_T_STRING && !*(const char *)field_at(item, k))
            return fail(ld, line_of(v), QERR_INVALID, shown, "'%s' is required", k->path);
    }
    return 0;
}

static int apply_list(loader_t *ld, const config_key_t *k, const yaml_node_t *v, void *base,
                      const char *key, int line) {
    char got[GOT_BUF];
    size_t max = k->size / k->item_size;
    if (is_null(v)) {
        *(int *)((char *)base + k->count_offset) = 0;
        return 0;
    }
    if (v->type != YAML_SEQUENCE_NODE)
        return fail(ld, line, QERR_INVALID, key, "expected a list, got %s",
                    describe(v, got, sizeof got));
    size_t count = (size_t)(v->data.sequence.items.top - v->data.sequence.items.start);
    if (count > max)
        return fail(ld, line, QERR_RANGE, key, "%zu items, more than the limit of %zu", count, max);
    for (size_t i = 0; i < count; i++) {
        yaml_node_t *item = yaml_document_get_node(ld->doc, v->data.sequence.items.start[i]);
        char shown[KEY_MAX];
        snprintf(shown, sizeof shown, "%s[%zu]", key, i);
        if (apply_item(ld, k, item, (char *)field_at(base, k) + i * k->item_size, shown,
                       ld->file ? line_of(item) : line))
            return -1;
    }
    *(int *)((char *)base + k->count_offset) = (int)count;
    return 0;
}

/* Parses node v as the value of row k and stores it in base (the config or a list item). */
static int apply_value(loader_t *ld, const config_key_t *k, const yaml_node_t *v, void *base,
                       const char *key, int line) {
    void *f = field_at(base, k);
    switch (k->type) {
    case CONFIG_T_INT: return parse_int(ld, line, key, v, k, (int *)f);
    case CONFIG_T_U64: return parse_u64(ld, line, key, v, (uint64_t *)f);
    case CONFIG_T_FLOAT: {
        double x;
        if (parse_number(ld, line, key, v, k, &x))
            return -1;
        if (!isfinite((float)x) || (x != 0 && (float)x == 0))
            return fail(ld, line, QERR_RANGE, key, "%g does not fit a float", x);
        *(float *)f = (float)x;
        return 0;
    }
    case CONFIG_T_DOUBLE: return parse_number(ld, line, key, v, k, (double *)f);
    case CONFIG_T_BOOL: return parse_bool(ld, line, key, v, (bool *)f);
    case CONFIG_T_STRING: return parse_string(ld, line, key, v, k, (char *)f);
    case CONFIG_T_ENUM: return parse_enum(ld, line, key, v, k->names, (int *)f);
    case CONFIG_T_RANGE: return parse_range(ld, line, key, v, k, (config_range_t *)f);
    case CONFIG_T_LIST: return apply_list(ld, k, v, base, key, line);
    case CONFIG_T_PRESET: {
        char name[CONFIG_NAME_MAX];
        qerr_t perr;
        if (parse_string(ld, line, key, v, k, name))
            return -1;
        if (apply_preset(ld->cfg, name, &perr))
            return fail(ld, line, QERR_INVALID, key, "%s", perr.msg);
        return 0;
    }
    case CONFIG_T_COUNT: break;
    }
    Q_ASSERT(!"unknown config type");
    return -1;
}

/* Applies a value to top-level row idx, honouring the preset pass and duplicate detection. */
static int apply_row(loader_t *ld, int idx, const yaml_node_t *v, const char *key, int line) {
    const config_key_t *k = schema_row(idx);
    if ((k->type == CONFIG_T_PRESET) != (ld->pass == 0))
        return 0;
    if (ld->seen[idx])
        return fail(ld, line, QERR_INVALID, key, "duplicate key (first set at line %d)",
                    ld->seen[idx]);
    ld->seen[idx] = line;
    if (apply_value(ld, k, v, ld->cfg, key, line))
        return -1;
    ld->cfg->origin[idx] = ld->file ? line : SET_ORIGIN;
    return 0;
}

static int walk_mapping(loader_t *ld, const yaml_node_t *map, const char *prefix,
                        const char *shown_prefix, const config_key_t *rows, size_t n, void *base,
                        int is_item) {
    char got[GOT_BUF];
    if (is_null(map))
        return 0;
    if (map->type != YAML_MAPPING_NODE)
        return fail(ld, line_of(map), QERR_INVALID, *shown_prefix ? shown_prefix : "(top level)",
                    "expected a mapping, got %s", describe(map, got, sizeof got));
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
         p++) {
        yaml_node_t *kn = yaml_document_get_node(ld->doc, p->key);
        yaml_node_t *vn = yaml_document_get_node(ld->doc, p->value);
        int line = line_of(kn);
        const char *name = scalar_of(kn);
        if (!name || !*name)
            return fail(ld, line, QERR_INVALID, *shown_prefix ? shown_prefix : "(top level)",
                        "keys must be non-empty strings");
        for (yaml_node_pair_t *q = map->data.mapping.pairs.start; q < p; q++) {
            yaml_node_t *prev = yaml_document_get_node(ld->doc, q->key);
            if (scalar_of(prev) && !strcmp(scalar_of(prev), name)) {
                char shown[KEY_MAX];
                join_path(shown, shown_prefix, name);
                return fail(ld, line, QERR_INVALID, shown, "duplicate key (first at line %d)",
                            line_of(prev));
            }
        }
        char path[KEY_MAX], shown[KEY_MAX];
        if (join_path(path, prefix, name) || join_path(shown, shown_prefix, name))
            return fail(ld, line, QERR_INVALID, shown_prefix, "key '%.40s...' is too long", name);
        int idx = find_row(path, rows, n);
        if (idx >= 0) {
            int rc = is_item ? apply_value(ld, &rows[idx], vn, base, shown, line)
                             : apply_row(ld, idx, vn, shown, line);
            if (rc)
                return -1;
        } else if (is_group(path, rows, n)) {
            if (walk_mapping(ld, vn, path, shown, rows, n, base, is_item))
                return -1;
        } else {
            return unknown_key(ld, line, shown, rows, n);
        }
    }
    return 0;
}

/* Applies a whole document's root mapping: the preset pass, then everything else. */
static int apply_root(loader_t *ld, const yaml_node_t *root) {
    size_t n;
    const config_key_t *rows = config_schema(&n);
    for (ld->pass = 0; ld->pass < 2; ld->pass++)
        if (walk_mapping(ld, root, "", "", rows, n, ld->cfg, 0))
            return -1;
    return 0;
}

/* ---- public: defaults, load, set ---- */

static int parse_text(const char *text, yaml_document_t *doc, const char *where, qerr_t *err) {
    yaml_parser_t parser;
    Q_ASSERT(yaml_parser_initialize(&parser));
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, strlen(text));
    int ok = yaml_parser_load(&parser, doc);
    if (!ok)
        qerr_set(err, QERR_PARSE, "%s: YAML syntax error at column %zu: %s", where,
                 parser.problem_mark.column + 1, parser.problem ? parser.problem : "unknown");
    yaml_parser_delete(&parser);
    return ok ? 0 : -1;
}

void config_defaults(quillan_config_t *cfg) {
    memset(cfg, 0, sizeof *cfg);
    size_t n;
    const config_key_t *rows = config_schema(&n);
    /* Row order matters: model.preset comes first and fills the model keys (def NULL). */
    for (size_t i = 0; i < n; i++) {
        if (!rows[i].def)
            continue;
        char where[KEY_MAX + 16];
        snprintf(where, sizeof where, "default of %s", rows[i].path);
        apply_default(cfg, &rows[i], where, cfg);
    }
}

static int syntax_error(const yaml_parser_t *parser, const char *path, qerr_t *err) {
    const char *problem = parser->problem ? parser->problem : "unknown";
    if (parser->context)
        return qerr_set(err, QERR_PARSE,
                        "%s:%zu:%zu: YAML syntax error: %s (%s started at line %zu)", path,
                        parser->problem_mark.line + 1, parser->problem_mark.column + 1, problem,
                        parser->context, parser->context_mark.line + 1);
    return qerr_set(err, QERR_PARSE, "%s:%zu:%zu: YAML syntax error: %s", path,
                    parser->problem_mark.line + 1, parser->problem_mark.column + 1, problem);
}

int config_load(quillan_config_t *cfg, const char *path, qerr_t *err) {
    if (strlen(path) >= sizeof cfg->source)
        return qerr_set(err, QERR_INVALID, "%.64s...: config path is too long", path);
    FILE *f = fopen(path, "rb");
    if (!f)
        return qerr_set(err, errno == ENOENT ? QERR_NOTFOUND : QERR_IO,
                        "%s: cannot open config file: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return qerr_set(err, QERR_IO, "%s: not a regular file", path);
    }
    if (st.st_size > CONFIG_FILE_MAX_BYTES) {
        fclose(f);
        return qerr_set(err, QERR_INVALID,
                        "%s: config file of %lld bytes is over the %d-byte limit", path,
                        (long long)st.st_size, CONFIG_FILE_MAX_BYTES);
    }
    yaml_parser_t parser;
    Q_ASSERT(yaml_parser_initialize(&parser));
    yaml_parser_set_input_file(&parser, f);
    yaml_document_t doc;
    int rc = 0;
    if (!yaml_parser_load(&parser, &doc)) {
        rc = syntax_error(&parser, path, err);
        yaml_parser_delete(&parser);
        fclose(f);
        return rc;
    }
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    yaml_document_t extra;
    if (root) {
        if (!yaml_parser_load(&parser, &extra)) {
            rc = syntax_error(&parser, path, err);
        } else {
            if (yaml_document_get_root_node(&extra))
                rc = qerr_set(err, QERR_PARSE,
                              "%s:%zu: a config holds one YAML document, found another", path,
                              extra.start_mark.line + 1);
            yaml_document_delete(&extra);
        }
    }
    yaml_parser_delete(&parser);
    fclose(f);
    if (rc == 0 && root) {
        copy_str(cfg->source, sizeof cfg->source, path);
        loader_t ld = {.cfg = cfg, .doc = &doc, .file = path, .err = err};
        if (root->type != YAML_MAPPING_NODE && !is_null(root)) {
            char got[GOT_BUF];
            rc = qerr_set(err, QERR_INVALID, "%s:%d: expected a mapping of sections, got %s", path,
                          line_of(root), describe(root, got, sizeof got));
        } else {
            rc = apply_root(&ld, root);
        }
    }
    yaml_document_delete(&doc);
    return rc;
}

/* "reward.services.<i>[.field]": applies v to item i of a list row; i == count appends. */
static int set_list_item(loader_t *ld, int idx, const char *rest, const yaml_node_t *v,
                         const char *key) {
    const config_key_t *k = schema_row(idx);
    int *count = (int *)((char *)ld->cfg + k->count_offset);
    char *end;
    errno = 0;
    long i = strtol(rest, &end, 10);
    if (end == rest || (*end && *end != '.') || i < 0 || errno)
        return fail(ld, 0, QERR_INVALID, key, "expected %s.<index>[.<field>]", k->path);
    size_t max = k->size / k->item_size;
    if (i > *count || (size_t)i >= max)
        return fail(ld, 0, QERR_RANGE, key, "index %ld is out of range [0, %d]", i,
                    *count < (int)max ? *count : (int)max - 1);
    char *item = (char *)field_at(ld->cfg, k) + (size_t)i * k->item_size;
    char shown[KEY_MAX];
    snprintf(shown, sizeof shown, "%s[%ld]", k->path, i);
    if (i == *count)
        item_defaults(k, item);
    int rc;
    if (*end == '.') {
        int f = find_row(end + 1, k->item_keys, k->n_item_keys);
        if (f < 0)
            return unknown_key(ld, 0, key, k->item_keys, k->n_item_keys);
        char item_key[KEY_MAX];
        if (snprintf(item_key, sizeof item_key, "%s.%s", shown, end + 1) >= (int)sizeof item_key)
            return fail(ld, 0, QERR_INVALID, key, "key is too long");
        rc = apply_value(ld, &k->item_keys[f], v, item, item_key, 0);
        if (rc == 0 && k->item_keys[f].required && !*(const char *)field_at(item, &k->item_keys[f]))
            rc = fail(ld, 0, QERR_INVALID, item_key, "is required");
    } else {
        rc = apply_item(ld, k, v, item, shown, 0);
    }
    if (rc == 0) {
        if (i == *count)
            (*count)++;
        ld->cfg->origin[idx] = SET_ORIGIN;
    }
    return rc;
}

int config_set(quillan_config_t *cfg, const char *assignment, qerr_t *err) {
    char where[SET_MAX];
    snprintf(where, sizeof where, "--set %s", assignment);
    const char *eq = strchr(assignment, '=');
    if (!eq || eq == assignment)
        return qerr_set(err, QERR_INVALID, "%s: expected section.key=value", where);
    char key[KEY_MAX];
    if ((size_t)(eq - assignment) >= sizeof key)
        return qerr_set(err, QERR_INVALID, "%s: key is too long", where);
    memcpy(key, assignment, (size_t)(eq - assignment));
    key[eq - assignment] = '\0';

    yaml_document_t doc;
    if (parse_text(*(eq + 1) ? eq + 1 : "''", &doc, where, err))
        return -1;
    loader_t ld = {.cfg = cfg, .doc = &doc, .where = where, .err = err};
    yaml_node_t *v = yaml_document_get_root_node(&doc);
    size_t n;
    const config_key_t *rows = config_schema(&n);
    int idx = find_row(key, rows, n), rc = -1;
    if (!v) {
        rc = qerr_set(err, QERR_INVALID, "%s: %s: no value", where, key);
    } else if (idx >= 0) {
        ld.pass = rows[idx].type == CONFIG_T_PRESET ? 0 : 1;
        rc = apply_row(&ld, idx, v, key, 0);
    } else if (is_group(key, rows, n)) {
        rc = 0;
        for (ld.pass = 0; rc == 0 && ld.pass < 2; ld.pass++)
            rc = walk_mapping(&ld, v, key, key, rows, n, cfg, 0);
    } else {
        for (size_t i = 0; i < n; i++) {
            size_t len = strlen(rows[i].path);
            if (rows[i].type == CONFIG_T_LIST && !strncmp(key, rows[i].path, len) &&
                key[len] == '.') {
                rc = set_list_item(&ld, (int)i, key + len + 1, v, key);
                idx = (int)i;
                break;
            }
        }
        if (idx < 0)
            rc = unknown_key(&ld, 0, key, rows, n);
    }
    yaml_document_delete(&doc);
    return rc;
}

/* ---- formatting values ---- */

#define VALUE_MAX (4 * CONFIG_PATH_MAX + 16) /* a path with every byte escaped, quoted */

/* Shortest decimal that reads back to the same double (or float). */
static void format_real(double x, int is_float, char *buf, size_t cap) {
    if (x == floor(x) && fabs(x) < 1e15) { /* integral: "30", not "3e+01" */
        snprintf(buf, cap, "%.0f", x);
        return;
    }
    for (int p = 1; p <= 17; p++) {
        snprintf(buf, cap, "%.*g", p, x);
        if (is_float ? strtof(buf, NULL) == (float)x : strtod(buf, NULL) == x)
            return;
    }
}

/* YAML double-quoted string: escapes quotes, backslashes and control bytes. */
static void format_quoted(const char *s, char *buf, size_t cap) {
    size_t o = 0;
    Q_ASSERT(cap >= 4 * strlen(s) + 3);
    buf[o++] = '"';
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            buf[o++] = '\\';
            buf[o++] = (char)c;
        } else if (c < 0x20 || c == 0x7f) {
            o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", c);
        } else {
            buf[o++] = (char)c;
        }
    }
    buf[o++] = '"';
    buf[o] = '\0';
}

/* Formats a scalar-typed field (every type but LIST) as YAML. */
static void format_value(const config_key_t *k, const void *base, char *buf, size_t cap) {
    const void *f = cfield_at(base, k);
    switch (k->type) {
    case CONFIG_T_INT: snprintf(buf, cap, "%d", *(const int *)f); return;
    case CONFIG_T_U64: snprintf(buf, cap, "%llu", (unsigned long long)*(const uint64_t *)f); return;
    case CONFIG_T_FLOAT: format_real(*(const float *)f, 1, buf, cap); return;
    case CONFIG_T_DOUBLE: format_real(*(const double *)f, 0, buf, cap); return;
    case CONFIG_T_BOOL: copy_str(buf, cap, *(const bool *)f ? "true" : "false"); return;
    case CONFIG_T_STRING:
    case CONFIG_T_PRESET: format_quoted((const char *)f, buf, cap); return;
    case CONFIG_T_ENUM: copy_str(buf, cap, k->names[*(const int *)f]); return;
    case CONFIG_T_RANGE: {
        const config_range_t *r = f;
        if (!r->enabled) {
            snprintf(buf, cap, "null");
            return;
        }
        char lo[32], hi[32];
        format_real(r->lo, 0, lo, sizeof lo);
        format_real(r->hi, 0, hi, sizeof hi);
        snprintf(buf, cap, "[%s, %s]", lo, hi);
        return;
    }
    case CONFIG_T_LIST:
    case CONFIG_T_COUNT: break;
    }
    Q_ASSERT(!"format_value: not a scalar type");
}

/* ---- origins and validation ---- */

const char *config_origin(const quillan_config_t *cfg, const char *key, char *buf, size_t cap) {
    char row_key[KEY_MAX];
    copy_str(row_key, sizeof row_key, key);
    row_key[strcspn(row_key, "[")] = '\0'; /* reward.services[0].address -> reward.services */
    int idx = config_schema_find(row_key);
    if (idx < 0 || cfg->origin[idx] == 0) {
        snprintf(buf, cap, "default");
    } else if (cfg->origin[idx] > 0) {
        snprintf(buf, cap, "%s:%d", cfg->source, cfg->origin[idx]);
    } else if (schema_row(idx)->type == CONFIG_T_LIST) {
        snprintf(buf, cap, "--set %s", row_key);
    } else {
        char value[VALUE_MAX];
        format_value(schema_row(idx), cfg, value, sizeof value);
        snprintf(buf, cap, "--set %s=%s", row_key, value);
    }
    return buf;
}

/* Prefix for a message about key: where its value came from, or the file for a default. */
static const char *origin_prefix(const quillan_config_t *cfg, const char *key, char *buf,
                                 size_t cap) {
    config_origin(cfg, key, buf, cap);
    if (!strcmp(buf, "default"))
        copy_str(buf, cap, cfg->source);
    return buf;
}

static int invalid(const quillan_config_t *cfg, qerr_t *err, qerr_code_t code, const char *key,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static int invalid(const quillan_config_t *cfg, qerr_t *err, qerr_code_t code, const char *key,
                   const char *fmt, ...) {
    char msg[QERR_MSG_MAX], where[SET_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    origin_prefix(cfg, key, where, sizeof where);
    if (*where)
        return qerr_set(err, code, "%s: %s: %s", where, key, msg);
    return qerr_set(err, code, "%s: %s", key, msg);
}

static int check_endpoint(const quillan_config_t *cfg, const char *key, const char *addr,
                          qerr_t *err) {
    static const char *const schemes[] = {"tcp://", "ipc://", "inproc://"};
    for (size_t i = 0; i < Q_ARRAY_LEN(schemes); i++) {
        size_t n = strlen(schemes[i]);
        if (!strncmp(addr, schemes[i], n) && addr[n])
            return 0;
    }
    return invalid(cfg, err, QERR_INVALID, key,
                   "'%s' is not a ZeroMQ endpoint (tcp://host:port, ipc://path or inproc://name)",
                   addr);
}

/* aux weights: -1 takes the mode's default; any other negative value is an error. */
static int resolve_aux(const quillan_config_t *cfg, const char *key, double *w, double sft,
                       qerr_t *err) {
    if (*w == -1)
        *w = cfg->learner.mode == CONFIG_MODE_SFT ? sft : 0.0;
    else if (*w < 0)
        return invalid(cfg, err, QERR_RANGE, key, "%g must be >= 0, or -1 for the mode's default",
                       *w);
    return 0;
}

/* Fewest bytes a TrajectoryGroup of G completions of T tokens each takes on the wire with
 * routing records: per token at least one byte per token id and router index (varints), 4 per
 * log-probability and 8 per plan word (fixed width). A group that cannot fit in a control frame
 * would be refused by every socket, sent again and again, and never trained on. */
static double group_wire_bytes_min(const model_config_t *m, int G, int T) {
    const double per_token =
        1.0 + 4.0 +
        (double)m->num_layers * m->top_k_minis * (1.0 + m->top_k_experts + m->top_k_micros) +
        8.0 * diffusion_words(m->diffusion_bits);
    return (double)G * T * per_token;
}

int config_validate(quillan_config_t *cfg, qerr_t *err) {
    if (model_config_validate(&cfg->model, err)) {
        if (err) {
            char key[KEY_MAX], where[SET_MAX];
            copy_str(key, sizeof key, err->msg);
            key[strcspn(key, ":")] = '\0';
            if (*origin_prefix(cfg, key, where, sizeof where))
                qerr_wrap(err, "%s", where);
        }
        return -1;
    }
    config_learner_t *l = &cfg->learner;
    const config_rollout_t *r = &cfg->rollout;
    const config_network_t *net = &cfg->network;

    if (l->mode == CONFIG_MODE_RL && l->group_size < 2)
        return invalid(cfg, err, QERR_INVALID, "learner.group_size",
                       "%d: RL needs at least 2 completions per group", l->group_size);
    if (l->minibatches > l->batch_groups)
        return invalid(cfg, err, QERR_INVALID, "learner.minibatches",
                       "%d is more than learner.batch_groups (%d)", l->minibatches,
                       l->batch_groups);
    if (l->warmup_steps > l->total_steps)
        return invalid(cfg, err, QERR_INVALID, "learner.warmup_steps",
                       "%d is more than learner.total_steps (%d)", l->warmup_steps, l->total_steps);
    if (r->max_new_tokens >= cfg->model.context)
        return invalid(cfg, err, QERR_INVALID, "rollout.max_new_tokens",
                       "%d leaves no room for a prompt in model.context (%d)", r->max_new_tokens,
                       cfg->model.context);
    if (l->mode == CONFIG_MODE_RL && cfg->model.routing_replay) {
        const double need = group_wire_bytes_min(&cfg->model, l->group_size, r->max_new_tokens);
        if (need > (double)net->max_msg_bytes)
            return invalid(cfg, err, QERR_INVALID, "network.max_msg_bytes",
                           "%lld is too small for a group of learner.group_size %d completions of "
                           "rollout.max_new_tokens %d tokens with model.routing_replay: it takes "
                           "at least %.0f bytes; raise network.max_msg_bytes or lower those",
                           (long long)net->max_msg_bytes, l->group_size, r->max_new_tokens, need);
    }
    if (r->top_k > cfg->model.vocab_size)
        return invalid(cfg, err, QERR_RANGE, "rollout.top_k",
                       "%d is more than model.vocab_size (%d)", r->top_k, cfg->model.vocab_size);
    if (l->overlong.max_len == 0)
        l->overlong.max_len = r->max_new_tokens;
    if (l->overlong.max_len > r->max_new_tokens)
        return invalid(cfg, err, QERR_INVALID, "learner.overlong.max_len",
                       "%d is more than rollout.max_new_tokens (%d)", l->overlong.max_len,
                       r->max_new_tokens);
    if (l->overlong.cache == 0)
        l->overlong.cache = l->overlong.max_len / 4 > 0 ? l->overlong.max_len / 4 : 1;
    if (l->overlong.cache > l->overlong.max_len)
        return invalid(cfg, err, QERR_INVALID, "learner.overlong.cache",
                       "%d is more than learner.overlong.max_len (%d)", l->overlong.cache,
                       l->overlong.max_len);
    if (resolve_aux(cfg, "learner.aux.balance", &l->aux.balance, 0.01, err) ||
        resolve_aux(cfg, "learner.aux.diffusion", &l->aux.diffusion, 0.2, err))
        return -1;
    if (l->sync_interval == 0)
        l->sync_interval = l->minibatches * l->ppo_epochs;

    if (l->mode == CONFIG_MODE_RL && cfg->reward.n_services == 0)
        return invalid(cfg, err, QERR_INVALID, "reward.services",
                       "RL needs at least one reward service");
    for (int i = 0; i < cfg->reward.n_services; i++) {
        char key[KEY_MAX];
        snprintf(key, sizeof key, "reward.services[%d].address", i);
        if (check_endpoint(cfg, key, cfg->reward.services[i].address, err))
            return -1;
    }
    if (cfg->reward.backoff_min_s > cfg->reward.backoff_max_s)
        return invalid(cfg, err, QERR_INVALID, "reward.backoff_min_s",
                       "%g is more than reward.backoff_max_s (%g)", cfg->reward.backoff_min_s,
                       cfg->reward.backoff_max_s);
    if (check_endpoint(cfg, "network.dispatcher", net->dispatcher, err) ||
        check_endpoint(cfg, "network.weights", net->weights, err) ||
        check_endpoint(cfg, "network.log_in", net->log_in, err) ||
        check_endpoint(cfg, "network.log_out", net->log_out, err))
        return -1;
    if (cfg->security.curve && !cfg->security.keys.server[0])
        return invalid(cfg, err, QERR_INVALID, "security.keys.server",
                       "security.curve needs the server key pair file");
    return 0;
}

/* ---- printing ---- */

/* Splits a dotted path into at most 8 components (pointers into buf). */
static int split_path(const char *path, char *buf, size_t cap, const char *parts[8]) {
    copy_str(buf, cap, path);
    int n = 0;
    for (char *s = buf;; s++) {
        Q_ASSERT(n < 8);
        parts[n++] = s;
        s = strchr(s, '.');
        if (!s)
            return n;
        *s = '\0';
    }
}

static void print_list(const config_key_t *k, const quillan_config_t *cfg, FILE *out, int indent) {
    int count = *(const int *)((const char *)cfg + k->count_offset);
    if (count == 0) {
        fprintf(out, " []\n");
        return;
    }
    fputc('\n', out);
    for (int i = 0; i < count; i++) {
        const char *item = (const char *)cfield_at(cfg, k) + (size_t)i * k->item_size;
        for (size_t j = 0; j < k->n_item_keys; j++) {
            char value[VALUE_MAX];
            format_value(&k->item_keys[j], item, value, sizeof value);
            fprintf(out, "%*s%s %s: %s\n", indent, "", j == 0 ? "-" : " ", k->item_keys[j].path,
                    value);
        }
    }
}

int config_print(const quillan_config_t *cfg, FILE *out, qerr_t *err) {
    size_t n;
    const config_key_t *rows = config_schema(&n);
    char prev_buf[KEY_MAX];
    const char *prev[8];
    int prev_n = 0;
    fprintf(out,
            "# Resolved Quillan config (quillan %s); `quillan config doc` describes every key.\n",
            QUILLAN_VERSION);
    for (size_t i = 0; i < n; i++) {
        char buf[KEY_MAX];
        const char *parts[8];
        int np = split_path(rows[i].path, buf, sizeof buf, parts);
        int common = 0;
        while (common < np - 1 && common < prev_n - 1 && !strcmp(parts[common], prev[common]))
            common++;
        for (int d = common; d < np - 1; d++)
            fprintf(out, "%s%*s%s:\n", d == 0 ? "\n" : "", 2 * d, "", parts[d]);
        fprintf(out, "%*s%s:", 2 * (np - 1), "", parts[np - 1]);
        if (rows[i].type == CONFIG_T_LIST) {
            print_list(&rows[i], cfg, out, 2 * np);
        } else {
            char value[VALUE_MAX];
            format_value(&rows[i], cfg, value, sizeof value);
            fprintf(out, " %s\n", value);
        }
        memcpy(prev_buf, buf, sizeof buf);
        prev_n = split_path(rows[i].path, prev_buf, sizeof prev_buf, prev);
    }
    if (fflush(out) != 0 || ferror(out))
        return qerr_set(err, QERR_IO, "writing the config: %s", strerror(errno));
    return 0;
}

/* ---- Markdown reference ---- */

static const char doc_intro[] =
    "# Quillan configuration reference\n"
    "\n"
    "Generated by `quillan config doc` from the schema table in `common/config_schema.c`; do "
    "not edit by hand.\n"
    "\n"
    "A run is configured by one YAML file with the sections below. Keys may be nested "
    "(`learner: {overlong: {cache: 64}}`) or dotted (`learner.overlong.cache: 64`), but each "
    "key may be set only once. Check a file and see every resolved value with `quillan config "
    "check FILE [--set section.key=value]...`; the printed YAML loads back to the same config.\n"
    "\n"
    "Resolution order: the defaults below, then the file, then each `--set` in order, then the "
    "cross-key checks (which also fill in the derived values marked 0 or -1 below). "
    "`--set` takes a YAML value: `--set learner.lr=3e-4`, `--set 'learner.advantage.clip=[0, "
    "1]'`, `--set reward.services.0.weight=2` (index = the list's length appends an item).\n"
    "\n"
    "Model presets: `model.preset` (`tiny` or `quillan-512m`) supplies the defaults of every "
    "`model.*` key; keys set explicitly, in the file or with `--set`, always override the "
    "preset, wherever they appear. The model defaults shown are those of `tiny`.\n"
    "\n"
    "Errors name where the value came from and the key, e.g. `configs/x.yaml:12: learner.lr: "
    "expected a number, got 'abc'` or `--set learner.lr=abc: learner.lr: ...`. Unknown keys "
    "(with the closest known key), duplicate keys, wrong types, out-of-range values, YAML "
    "syntax errors (with line and column) and missing files are all errors. Paths are used as "
    "given, relative to the working directory.\n";

/* Writes s into a Markdown table cell, escaping the column separator. */
static void md_cell(FILE *out, const char *s) {
    fputs(" ", out);
    for (; *s; s++) {
        if (*s == '|')
            fputc('\\', out);
        fputc(*s, out);
    }
    fputs(" |", out);
}

static void md_allowed(const config_key_t *k, char *buf, size_t cap) {
    buf[0] = '\0';
    switch (k->type) {
    case CONFIG_T_INT: snprintf(buf, cap, "%.0f .. %.0f", k->min, k->max); break;
    case CONFIG_T_FLOAT:
    case CONFIG_T_DOUBLE:
        snprintf(buf, cap, "%c%g, %g]", k->min_open ? '(' : '[', k->min, k->max);
        break;
    case CONFIG_T_U64: snprintf(buf, cap, "0 .. 2^64-1"); break;
    case CONFIG_T_BOOL: snprintf(buf, cap, "true, false"); break;
    case CONFIG_T_STRING: snprintf(buf, cap, "up to %zu bytes", k->size - 1); break;
    case CONFIG_T_RANGE:
        snprintf(buf, cap, "null, or [lo, hi] within [%g, %g]", k->min, k->max);
        break;
    case CONFIG_T_LIST: snprintf(buf, cap, "up to %zu items", k->size / k->item_size); break;
    case CONFIG_T_ENUM:
    case CONFIG_T_PRESET: {
        const char *const *names =
            k->type == CONFIG_T_ENUM ? k->names : model_config_preset_names();
        for (int i = 0; names[i]; i++) {
            size_t used = strlen(buf);
            snprintf(buf + used, cap - used, "%s`%s`", i ? ", " : "", names[i]);
        }
        break;
    }
    case CONFIG_T_COUNT: break;
    }
}

static void md_row(FILE *out, const char *key, const config_key_t *k, const char *def) {
    char allowed[256], cell[VALUE_MAX + 4];
    snprintf(cell, sizeof cell, "`%s`", key);
    fputs("|", out);
    md_cell(out, cell);
    md_cell(out, config_type_name(k->type));
    md_cell(out, def);
    md_allowed(k, allowed, sizeof allowed);
    md_cell(out, allowed);
    md_cell(out, k->unit);
    md_cell(out, k->doc);
    fputc('\n', out);
}

int config_doc_markdown(FILE *out, qerr_t *err) {
    quillan_config_t *defaults = malloc(sizeof *defaults);
    if (!defaults)
        return qerr_set(err, QERR_NOMEM, "config doc: out of memory");
    config_defaults(defaults);
    fputs(doc_intro, out);
    size_t n;
    const config_key_t *rows = config_schema(&n);
    size_t section_len = 0;
    for (size_t i = 0; i < n; i++) {
        const config_key_t *k = &rows[i];
        size_t len = strcspn(k->path, ".");
        if (i == 0 || len != section_len || strncmp(k->path, rows[i - 1].path, len) != 0) {
            fprintf(out,
                    "\n## %.*s\n\n| key | type | default | allowed | unit | description |\n"
                    "| --- | --- | --- | --- | --- | --- |\n",
                    (int)len, k->path);
            section_len = len;
        }
        if (k->type == CONFIG_T_LIST) {
            char cell[VALUE_MAX + 4];
            snprintf(cell, sizeof cell, "`%s`", k->def);
            md_row(out, k->path, k, cell);
            for (size_t j = 0; j < k->n_item_keys; j++) {
                const config_key_t *item = &k->item_keys[j];
                char key[KEY_MAX], quoted[VALUE_MAX];
                snprintf(key, sizeof key, "%s[].%s", k->path, item->path);
                if (item->type == CONFIG_T_STRING)
                    format_quoted(item->def, quoted, sizeof quoted);
                else
                    copy_str(quoted, sizeof quoted, item->def);
                if (item->required)
                    copy_str(cell, sizeof cell, "(required)");
                else
                    snprintf(cell, sizeof cell, "`%s`", quoted);
                md_row(out, key, item, cell);
            }
            continue;
        }
        char def[VALUE_MAX];
        def[0] = '`';
        format_value(k, defaults, def + 1, sizeof def - 2);
        strcat(def, "`");
        md_row(out, k->path, k, def);
    }
    free(defaults);
    if (fflush(out) != 0 || ferror(out))
        return qerr_set(err, QERR_IO, "writing the config reference: %s", strerror(errno));
    return 0;
}

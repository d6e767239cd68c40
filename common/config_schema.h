/* The configuration schema: one table row per key of a run's config (ARCHITECTURE.md §5).
 *
 * A row names the key's dotted path, its type, where it lives in quillan_config_t, its default
 * (as YAML text, parsed by the same code as a config file), its range or allowed values, its
 * unit and a one-line description. The loader, the printer, `--set`, the validator's error
 * locations and docs/CONFIG.md all read this table, so adding a key is adding a field to
 * quillan_config_t (config.h) and one row to config_schema.c. */
#ifndef QUILLAN_CONFIG_SCHEMA_H
#define QUILLAN_CONFIG_SCHEMA_H

#include <stdbool.h>
#include <stddef.h>

typedef enum {
    CONFIG_T_INT = 0, /* int */
    CONFIG_T_U64,     /* uint64_t, full range (seeds) */
    CONFIG_T_FLOAT,   /* float */
    CONFIG_T_DOUBLE,  /* double */
    CONFIG_T_BOOL,    /* bool: true/false (also yes/no, on/off) */
    CONFIG_T_STRING,  /* char[size], NUL-terminated */
    CONFIG_T_ENUM,    /* a C enum (int-sized); `names` index = value */
    CONFIG_T_RANGE,   /* config_range_t: [lo, hi], or null for off */
    CONFIG_T_LIST,    /* an inline array of items described by `item_keys`, with an int count */
    CONFIG_T_PRESET,  /* char[size] naming a model preset; see config.h for its semantics */
    CONFIG_T_COUNT
} config_type_t;

typedef struct config_key {
    const char *path; /* "learner.overlong.cache"; for list items, the field name ("weight") */
    config_type_t type;
    size_t offset; /* of the field in quillan_config_t (or in the item struct) */
    size_t size;   /* sizeof the field: string capacity, or the item array's bytes */
    /* Default as YAML text, applied by config_defaults; NULL for model keys, whose defaults
     * come from the model preset. For list item fields: the value when an item omits it. */
    const char *def;
    double min, max;          /* inclusive numeric range for INT, FLOAT, DOUBLE, RANGE ends */
    bool min_open;            /* the range excludes min ("(0, 1]") */
    bool required;            /* list item fields only: an item must set it */
    const char *const *names; /* ENUM: allowed values, NULL-terminated */
    const char *unit;         /* "s", "bytes", "steps", ... or "" */
    const char *doc;          /* one line for docs/CONFIG.md */
    /* LIST only */
    const struct config_key *item_keys;
    size_t n_item_keys;
    size_t item_size;    /* sizeof one item */
    size_t count_offset; /* of the int item count in quillan_config_t */
} config_key_t;

/* The table, in print order: keys of one section (and of one nested group) are contiguous.
 * *n receives the number of rows. Static storage. */
const config_key_t *config_schema(size_t *n);

/* Row index of an exact key path, or -1. */
int config_schema_find(const char *path);

/* Lowercase type name for messages and docs ("integer", "number", "boolean", ...). */
const char *config_type_name(config_type_t type);

#endif

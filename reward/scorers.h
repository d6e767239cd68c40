/* Built-in scorers of `quillan-reward` and the batch types shared by the reward service and
 * the reward client.
 *
 * Every scorer answers a reward_score_t: a number, or "no reward" (has = false), which is not
 * the same as 0: it means the sample cannot be judged (the reference answer is missing, say)
 * and the learner must leave the sample out instead of treating it as wrong.
 *
 * Scorers (config keys reward.builtin.*, docs/CONFIG.md):
 *   exact    1 when the normalised completion equals the normalised answer, else 0.
 *            Normalised: every trailing copy of eos_text removed, then surrounding ASCII
 *            whitespace trimmed. No reward when the answer is missing or not a JSON scalar.
 *   numeric  1 when the last number in the completion is within tolerance of the numeric
 *            answer: |x - y| <= max(abs_tol, rel_tol |y|); 0 when it is not, or when the
 *            completion holds no number. No reward when the answer is missing or not a number.
 *   format   1 when the PCRE2 pattern matches somewhere in the completion, else 0.
 *   length   0 up to `target`, falling linearly to -1 at target + window, -1 beyond (a step
 *            from 0 to -1 just past target when window is 0). Length in tokens or bytes.
 * A config combines them: the score is the sum of weight x score over the scorers whose weight
 * is non-zero, and "no reward" when any of those says "no reward". */
#ifndef QUILLAN_REWARD_SCORERS_H
#define QUILLAN_REWARD_SCORERS_H

#include "config.h"
#include "error.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Samples one request may carry (learner.group_size's upper bound). */
#define REWARD_MAX_SAMPLES 4096u

/* Finish reasons, numbered as FinishReason in proto/common.proto. */
typedef enum {
    REWARD_FINISH_STOP = 1,   /* EOS or a stop token */
    REWARD_FINISH_LENGTH = 2, /* max_new_tokens or the context was reached */
    REWARD_FINISH_ERROR = 3   /* the sampler failed; the completion is partial */
} reward_finish_t;

/* One (prompt, completion) pair. Borrowed pointers; strings are UTF-8, NUL-terminated. */
typedef struct {
    const char *prompt;
    const char *completion;
    const uint32_t *prompt_tokens; /* [n_prompt_tokens]; may be NULL when n is 0 */
    size_t n_prompt_tokens;
    const uint32_t *completion_tokens; /* [n_completion_tokens] */
    size_t n_completion_tokens;
    reward_finish_t finish_reason;
} reward_sample_t;

/* A metadata entry: the dataset line's other fields; value is JSON text ("\"42\"", "42"). */
typedef struct {
    const char *key;
    const char *value;
} reward_kv_t;

/* One task's samples (a group of G completions of one prompt) and its metadata. Borrowed. */
typedef struct {
    const char *task; /* free label, may be "" */
    const reward_sample_t *samples;
    size_t n_samples; /* >= 1 */
    const reward_kv_t *metadata;
    size_t n_metadata;
} reward_batch_t;

/* A score, or "no reward" (has = false; value is then 0 and meaningless). */
typedef struct {
    bool has;
    double value;
} reward_score_t;

/* Decodes the JSON metadata value of key into text: a JSON string gives its contents, a number
 * or boolean its JSON text. Returns 1 with a malloc'd string in *out (the caller frees it),
 * 0 when the key is absent or its value is null, -1 with err when the value is not JSON or is
 * an array or object. */
int reward_metadata_text(const reward_kv_t *md, size_t n, const char *key, char **out, qerr_t *err);

/* Exact match of completion and answer, both normalised as above (eos_text may be "" or NULL).
 * answer NULL = missing: no reward. */
reward_score_t reward_score_exact(const char *completion, const char *answer, const char *eos_text);

/* The last number in text (optional '-', digits with optional ',' thousands separators, an
 * optional fraction and exponent; a sign counts only when no letter or digit precedes it).
 * Returns 1 with *out, or 0 when text holds no number. */
int reward_number_last(const char *text, double *out);

/* Parses answer text as exactly one number (surrounding whitespace allowed). Returns 1 with
 * *out, or 0 when it is not a number. */
int reward_number_parse(const char *text, double *out);

/* Numeric match of the completion's last number against answer (text of a number). answer
 * NULL or not a number: no reward. */
reward_score_t reward_score_numeric(const char *completion, const char *answer, double abs_tol,
                                    double rel_tol);

/* Length penalty of a completion of len units (tokens or bytes). */
reward_score_t reward_score_length(size_t len, int target, int window);

/* The configured combination of scorers (with a compiled PCRE2 pattern). Read-only after
 * creation, so one instance may score from several threads. */
typedef struct reward_scorers reward_scorers_t;

/* Checks cfg (at least one weight non-zero; a pattern when format is on, which must compile)
 * and compiles the pattern. Errors name the key: "reward.builtin.format.regex: missing ')' at
 * offset 3". Returns NULL with err (QERR_INVALID, QERR_NOMEM). cfg is copied. */
reward_scorers_t *reward_scorers_new(const config_reward_builtin_t *cfg, qerr_t *err);

void reward_scorers_destroy(reward_scorers_t **s);

/* 1 when the pattern matches somewhere in text (len bytes), else 0; Q_ASSERTs that format is
 * on. Returns -1 with err when PCRE2 fails (match limit, out of memory). */
int reward_scorers_format_match(const reward_scorers_t *s, const char *text, size_t len,
                                qerr_t *err);

/* Scores every sample of batch into out[batch->n_samples]. When detail is non-NULL, detail[i]
 * receives a short explanation of sample i ("exact=1 numeric=0" or "no reward: answer
 * missing"), at most detail_cap bytes each (NUL included) in one buffer of
 * n_samples x detail_cap bytes. Returns 0, or -1 with err when the batch as a whole cannot be
 * scored (a PCRE2 failure, out of memory); a missing or odd answer is "no reward", not -1. */
int reward_scorers_score(const reward_scorers_t *s, const reward_batch_t *batch,
                         reward_score_t *out, char *detail, size_t detail_cap, qerr_t *err);

#endif

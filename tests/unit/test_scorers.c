/* The built-in reward scorers (reward/scorers.h) on hand-worked cases. */
#include "config.h"
#include "scorers.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define EOS "<|endoftext|>"
/* Scores are sums of a few products of short decimals: equal to within rounding. */
#define SCORE_TOL 1e-12

static void expect_score(reward_score_t s, double want) {
    cr_assert(s.has, "expected a score of %g, got \"no reward\"", want);
    cr_assert(fabs(s.value - want) <= SCORE_TOL, "expected %g, got %.17g", want, s.value);
}

static void expect_none(reward_score_t s) {
    cr_assert(!s.has, "expected \"no reward\", got %g", s.value);
}

/* ---- exact ---- */

Test(exact, normalises_whitespace_and_eos) {
    expect_score(reward_score_exact("42", "42", EOS), 1);
    expect_score(reward_score_exact("  42\n" EOS, "42", EOS), 1);
    expect_score(reward_score_exact("42 ", " 42\t", EOS), 1);
    expect_score(reward_score_exact("x" EOS "\n" EOS "  ", "x", EOS), 1);
    expect_score(reward_score_exact("x" EOS, "x", ""), 0); /* no EOS text configured */
    expect_score(reward_score_exact("x" EOS, "x", NULL), 0);
}

Test(exact, differences_score_zero) {
    expect_score(reward_score_exact("41", "42", EOS), 0);
    expect_score(reward_score_exact("Paris", "paris", EOS), 0);
    expect_score(reward_score_exact("4 2", "42", EOS), 0);
    expect_score(reward_score_exact("", "42", EOS), 0);
    expect_score(reward_score_exact("", "", EOS), 1);
    expect_score(reward_score_exact("42 and more", "42", EOS), 0);
}

Test(exact, missing_answer_is_no_reward) {
    expect_none(reward_score_exact("42", NULL, EOS));
}

/* ---- numbers ---- */

static void expect_last(const char *text, double want) {
    double got = NAN;
    cr_assert_eq(reward_number_last(text, &got), 1, "no number found in '%s'", text);
    cr_assert(got == want, "last number of '%s': expected %g, got %.17g", text, want, got);
}

Test(numeric, last_number) {
    expect_last("The answer is 42.", 42);
    expect_last("1,234 apples and 5", 5);
    expect_last("it costs 1,234", 1234);
    expect_last("1,000,000 ways", 1000000);
    expect_last("x = -3.5", -3.5);
    expect_last("3-4", 4);       /* a minus after a digit is not a sign */
    expect_last("range a-7", 7); /* nor after a letter */
    expect_last("(-7)", -7);
    expect_last("1e3", 1000);
    expect_last("2. Then 7.25", 7.25);
    expect_last("about .5 of it", 0.5);
    expect_last("12,34", 34); /* not a thousands separator */
    expect_last("3 eggs", 3);
    expect_last("5e+x", 5);
    double v = 0;
    cr_assert_eq(reward_number_last("no numbers here", &v), 0);
    cr_assert_eq(reward_number_last("", &v), 0);
    cr_assert_eq(reward_number_last("-", &v), 0);
}

Test(numeric, parse_whole_answer) {
    double v = 0;
    cr_assert_eq(reward_number_parse(" 42 ", &v), 1);
    cr_assert_eq(v, 42);
    cr_assert_eq(reward_number_parse("-7", &v), 1);
    cr_assert_eq(v, -7);
    cr_assert_eq(reward_number_parse("+7.5", &v), 1);
    cr_assert_eq(v, 7.5);
    cr_assert_eq(reward_number_parse("1,000", &v), 1);
    cr_assert_eq(v, 1000);
    cr_assert_eq(reward_number_parse("4 2", &v), 0);
    cr_assert_eq(reward_number_parse("abc", &v), 0);
    cr_assert_eq(reward_number_parse("42abc", &v), 0);
    cr_assert_eq(reward_number_parse("", &v), 0);
    cr_assert_eq(reward_number_parse("- 5", &v), 0);
}

Test(numeric, tolerance) {
    expect_score(reward_score_numeric("pi is 3.14159", "3.14", 0.01, 0), 1);
    expect_score(reward_score_numeric("pi is 3.14159", "3.14", 1e-6, 0), 0);
    expect_score(reward_score_numeric("1005", "1000", 0, 0.01), 1);
    expect_score(reward_score_numeric("1011", "1000", 0, 0.01), 0);
    expect_score(reward_score_numeric("so 6 then 7", "6", 1e-6, 0), 0); /* the last one counts */
    expect_score(reward_score_numeric("it is 1,234.", "1234", 1e-6, 0), 1);
}

Test(numeric, no_number_is_zero_missing_answer_is_no_reward) {
    expect_score(reward_score_numeric("I do not know", "5", 1e-6, 0), 0);
    expect_none(reward_score_numeric("5", NULL, 1e-6, 0));
    expect_none(reward_score_numeric("5", "five", 1e-6, 0));
}

/* ---- length ---- */

Test(length, three_regions) {
    expect_score(reward_score_length(0, 10, 4), 0);
    expect_score(reward_score_length(10, 10, 4), 0);
    expect_score(reward_score_length(11, 10, 4), -0.25);
    expect_score(reward_score_length(12, 10, 4), -0.5);
    expect_score(reward_score_length(14, 10, 4), -1);
    expect_score(reward_score_length(100, 10, 4), -1);
    expect_score(reward_score_length(10, 10, 0), 0);
    expect_score(reward_score_length(11, 10, 0), -1);
}

/* ---- metadata ---- */

Test(metadata, json_values) {
    reward_kv_t md[] = {{"s", "\"42\""}, {"n", "42"},  {"f", " 1.50 "}, {"b", "true"},
                        {"z", "null"},   {"a", "[1]"}, {"o", "{bad"},   {"u", "\"caf\\u00e9\""}};
    size_t n = Q_ARRAY_LEN(md);
    char *t = NULL;
    qerr_t e;
    cr_assert_eq(reward_metadata_text(md, n, "s", &t, &e), 1);
    cr_assert_str_eq(t, "42");
    free(t);
    cr_assert_eq(reward_metadata_text(md, n, "n", &t, &e), 1);
    cr_assert_str_eq(t, "42");
    free(t);
    cr_assert_eq(reward_metadata_text(md, n, "f", &t, &e), 1);
    cr_assert_str_eq(t, "1.50", "a number keeps its written form, got '%s'", t);
    free(t);
    cr_assert_eq(reward_metadata_text(md, n, "b", &t, &e), 1);
    cr_assert_str_eq(t, "true");
    free(t);
    cr_assert_eq(reward_metadata_text(md, n, "u", &t, &e), 1);
    cr_assert_str_eq(t, "caf\xc3\xa9");
    free(t);
    cr_assert_eq(reward_metadata_text(md, n, "z", &t, &e), 0);
    cr_assert_null(t);
    cr_assert_eq(reward_metadata_text(md, n, "missing", &t, &e), 0);
    cr_assert_eq(reward_metadata_text(md, n, "a", &t, &e), -1);
    cr_assert(strstr(e.msg, "metadata 'a'") && strstr(e.msg, "array"), "%s", e.msg);
    cr_assert_eq(reward_metadata_text(md, n, "o", &t, &e), -1);
    cr_assert(strstr(e.msg, "metadata 'o'"), "%s", e.msg);
}

/* ---- the combination ---- */

static config_reward_builtin_t builtin_defaults(void) {
    static quillan_config_t cfg;
    config_defaults(&cfg);
    return cfg.reward.builtin;
}

Test(scorers, config_errors_name_the_key) {
    qerr_t e;
    config_reward_builtin_t c = builtin_defaults();
    c.exact_weight = 0;
    cr_assert_null(reward_scorers_new(&c, &e));
    cr_assert(strstr(e.msg, "reward.builtin"), "%s", e.msg);

    c = builtin_defaults();
    c.format_weight = 1;
    cr_assert_null(reward_scorers_new(&c, &e));
    cr_assert(strstr(e.msg, "reward.builtin.format.regex"), "%s", e.msg);

    strcpy(c.format_regex, "a(b");
    cr_assert_null(reward_scorers_new(&c, &e));
    cr_assert(strstr(e.msg, "reward.builtin.format.regex") && strstr(e.msg, "offset 3"), "%s",
              e.msg);

    c = builtin_defaults();
    c.answer_key[0] = '\0';
    cr_assert_null(reward_scorers_new(&c, &e));
    cr_assert(strstr(e.msg, "reward.builtin.answer_key"), "%s", e.msg);
}

Test(scorers, format_regex) {
    config_reward_builtin_t c = builtin_defaults();
    c.exact_weight = 0;
    c.format_weight = 1;
    strcpy(c.format_regex, "^<answer>[0-9]+</answer>$");
    qerr_t e;
    reward_scorers_t *s = reward_scorers_new(&c, &e);
    cr_assert_not_null(s, "%s", e.msg);
    const char *yes = "<answer>12</answer>", *no = "<answer>twelve</answer>";
    cr_assert_eq(reward_scorers_format_match(s, yes, strlen(yes), &e), 1);
    cr_assert_eq(reward_scorers_format_match(s, no, strlen(no), &e), 0);
    cr_assert_eq(reward_scorers_format_match(s, "x", 1, &e), 0);
    reward_scorers_destroy(&s);
    cr_assert_null(s);
    reward_scorers_destroy(&s);
}

static reward_sample_t text_sample(const char *completion, size_t n_tokens) {
    static const uint32_t toks[64];
    return (reward_sample_t){.prompt = "What is 5 + 7?",
                             .completion = completion,
                             .completion_tokens = toks,
                             .n_completion_tokens = n_tokens,
                             .finish_reason = REWARD_FINISH_STOP};
}

Test(scorers, weighted_sum_and_no_reward) {
    config_reward_builtin_t c = builtin_defaults();
    c.exact_weight = 1;
    c.numeric_weight = 0.5;
    c.format_weight = 0.25;
    strcpy(c.format_regex, "^[0-9]+$");
    c.length_weight = 2;
    c.length_unit = CONFIG_LENGTH_TOKENS;
    c.length_target = 4;
    c.length_window = 4;
    qerr_t e;
    reward_scorers_t *s = reward_scorers_new(&c, &e);
    cr_assert_not_null(s, "%s", e.msg);

    reward_sample_t x[] = {
        text_sample("12", 2),                  /* 1 + 0.5 + 0.25 + 0       = 1.75 */
        text_sample("It is 12" EOS, 6),        /* 0 + 0.5 + 0    + 2(-0.5) = -0.5 */
        text_sample("13", 8),                  /* 0 + 0   + 0.25 + 2(-1)   = -1.75 */
        text_sample("no idea", 0),             /* 0 + 0   + 0    + 0       = 0 */
        text_sample("  12\n" EOS "\n" EOS, 5), /* 1 + 0.5 + 0    + 2(-.25) = 1.0 */
    };
    double want[] = {1.75, -0.5, -1.75, 0, 1.0};
    reward_kv_t md[] = {{"answer", "\"12\""}, {"level", "3"}};
    reward_batch_t b = {.task = "add",
                        .samples = x,
                        .n_samples = Q_ARRAY_LEN(x),
                        .metadata = md,
                        .n_metadata = Q_ARRAY_LEN(md)};
    reward_score_t out[Q_ARRAY_LEN(x)];
    char detail[Q_ARRAY_LEN(x)][96];
    cr_assert_eq(reward_scorers_score(s, &b, out, &detail[0][0], sizeof detail[0], &e), 0, "%s",
                 e.msg);
    for (size_t i = 0; i < Q_ARRAY_LEN(x); i++)
        expect_score(out[i], want[i]);
    cr_assert_str_eq(detail[0], "exact=1 numeric=1 format=1 length=0");
    cr_assert_str_eq(detail[1], "exact=0 numeric=1 format=0 length=-0.5");

    /* The answer missing: every sample has no reward, though format and length could score. */
    b.metadata = &md[1];
    b.n_metadata = 1;
    cr_assert_eq(reward_scorers_score(s, &b, out, &detail[0][0], sizeof detail[0], &e), 0);
    for (size_t i = 0; i < Q_ARRAY_LEN(x); i++)
        expect_none(out[i]);
    cr_assert(strstr(detail[0], "no reward: metadata has no 'answer'"), "%s", detail[0]);

    /* An answer that is not JSON: no reward too, with the reason. */
    reward_kv_t bad[] = {{"answer", "12 apples"}};
    b.metadata = bad;
    cr_assert_eq(reward_scorers_score(s, &b, out, NULL, 0, &e), 0);
    for (size_t i = 0; i < Q_ARRAY_LEN(x); i++)
        expect_none(out[i]);
    reward_scorers_destroy(&s);
}

Test(scorers, answer_free_scorers_never_say_no_reward) {
    config_reward_builtin_t c = builtin_defaults();
    c.exact_weight = 0;
    c.length_weight = 1;
    c.length_unit = CONFIG_LENGTH_BYTES;
    c.length_target = 3;
    c.length_window = 2;
    qerr_t e;
    reward_scorers_t *s = reward_scorers_new(&c, &e);
    cr_assert_not_null(s, "%s", e.msg);
    reward_sample_t x[] = {text_sample("abc", 50), text_sample("abcd", 0),
                           text_sample("abcdefgh", 1)};
    reward_batch_t b = {.samples = x, .n_samples = Q_ARRAY_LEN(x)};
    reward_score_t out[Q_ARRAY_LEN(x)];
    cr_assert_eq(reward_scorers_score(s, &b, out, NULL, 0, &e), 0);
    expect_score(out[0], 0);
    expect_score(out[1], -0.5);
    expect_score(out[2], -1);
    reward_scorers_destroy(&s);
}

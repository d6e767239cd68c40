/* Test header for the compute core's tests.
 *
 * With Criterion installed (every developer and CI machine) this is just Criterion. On a bare
 * GPU machine that has only a compiler, libc and libm, QTEST_STANDALONE provides the small
 * subset of Criterion's API that the core tests use (Test, cr_assert*, cr_expect*, cr_skip_test,
 * cr_log_info), so the same test files build and run there. Each Test runs in-process; a failed
 * assertion ends that test and the runner exits non-zero. */
#ifndef QUILLAN_QTEST_H
#define QUILLAN_QTEST_H

#ifndef QTEST_STANDALONE
#include <criterion/criterion.h>
#include <criterion/logging.h>
#else

#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct qtest_case {
    const char *suite, *name;
    void (*fn)(void);
    struct qtest_case *next;
} qtest_case_t;

extern qtest_case_t *qtest_head;
extern jmp_buf qtest_jmp;
extern int qtest_failed_now, qtest_skipped_now;

#define Test(suite_, name_, ...)                                                                   \
    static void qtest_fn_##suite_##_##name_(void);                                                 \
    static qtest_case_t qtest_case_##suite_##_##name_ = {#suite_, #name_,                          \
                                                         qtest_fn_##suite_##_##name_, NULL};       \
    __attribute__((constructor)) static void qtest_reg_##suite_##_##name_(void) {                  \
        qtest_case_##suite_##_##name_.next = qtest_head;                                           \
        qtest_head = &qtest_case_##suite_##_##name_;                                               \
    }                                                                                              \
    static void qtest_fn_##suite_##_##name_(void)

#define QTEST_FAIL_(fatal, cond_str, ...)                                                          \
    do {                                                                                           \
        fprintf(stderr, "[FAIL] %s:%d: %s", __FILE__, __LINE__, cond_str);                         \
        fprintf(stderr, " " __VA_ARGS__);                                                          \
        fprintf(stderr, "\n");                                                                     \
        qtest_failed_now = 1;                                                                      \
        if (fatal)                                                                                 \
            longjmp(qtest_jmp, 1);                                                                 \
    } while (0)

#define cr_assert(cond, ...)                                                                       \
    do {                                                                                           \
        if (!(cond))                                                                               \
            QTEST_FAIL_(1, #cond, __VA_ARGS__);                                                    \
    } while (0)
#define cr_expect(cond, ...)                                                                       \
    do {                                                                                           \
        if (!(cond))                                                                               \
            QTEST_FAIL_(0, #cond, __VA_ARGS__);                                                    \
    } while (0)
#define cr_assert_not(cond, ...) cr_assert(!(cond), __VA_ARGS__)
#define cr_assert_eq(a, b, ...) cr_assert((a) == (b), __VA_ARGS__)
#define cr_assert_neq(a, b, ...) cr_assert((a) != (b), __VA_ARGS__)
#define cr_assert_lt(a, b, ...) cr_assert((a) < (b), __VA_ARGS__)
#define cr_assert_leq(a, b, ...) cr_assert((a) <= (b), __VA_ARGS__)
#define cr_assert_gt(a, b, ...) cr_assert((a) > (b), __VA_ARGS__)
#define cr_assert_geq(a, b, ...) cr_assert((a) >= (b), __VA_ARGS__)
#define cr_assert_null(p, ...) cr_assert((p) == NULL, __VA_ARGS__)
#define cr_assert_not_null(p, ...) cr_assert((p) != NULL, __VA_ARGS__)
#define cr_assert_str_eq(a, b, ...) cr_assert(strcmp((a), (b)) == 0, __VA_ARGS__)
#define cr_assert_float_eq(a, b, eps, ...)                                                         \
    cr_assert(fabs((double)(a) - (double)(b)) <= (eps), __VA_ARGS__)
#define cr_expect_eq(a, b, ...) cr_expect((a) == (b), __VA_ARGS__)
#define cr_expect_float_eq(a, b, eps, ...)                                                         \
    cr_expect(fabs((double)(a) - (double)(b)) <= (eps), __VA_ARGS__)
#define cr_log_info(...) (fprintf(stderr, __VA_ARGS__), fputc('\n', stderr))
#define cr_skip_test(...)                                                                          \
    do {                                                                                           \
        fprintf(stderr, "[SKIP] " __VA_ARGS__);                                                    \
        fputc('\n', stderr);                                                                       \
        qtest_skipped_now = 1;                                                                     \
        longjmp(qtest_jmp, 1);                                                                     \
    } while (0)

qtest_case_t *qtest_head;
jmp_buf qtest_jmp;
int qtest_failed_now, qtest_skipped_now;

/* setjmp lives in its own frame so no local of main can be clobbered by longjmp. */
static void qtest_run_one(const qtest_case_t *c) {
    qtest_failed_now = qtest_skipped_now = 0;
    if (setjmp(qtest_jmp) == 0)
        c->fn();
}

int main(void) {
    int failed = 0, passed = 0, skipped = 0;
    for (qtest_case_t *c = qtest_head; c; c = c->next) {
        qtest_run_one(c);
        if (qtest_failed_now)
            failed++;
        else if (qtest_skipped_now)
            skipped++;
        else
            passed++;
        fprintf(stderr, "[%s] %s::%s\n",
                qtest_failed_now    ? "FAIL"
                : qtest_skipped_now ? "SKIP"
                                    : " OK ",
                c->suite, c->name);
    }
    fprintf(stderr, "Synthesis: passed %d, failed %d, skipped %d\n", passed, failed, skipped);
    return failed ? 1 : 0;
}

#endif
#endif

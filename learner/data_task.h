/* Built-in synthetic tasks for demos and tests (`quillan data make-task`).
 *
 * addition: prompts "a+b=" with a and b of 1 to 3 digits (the digit count drawn uniformly, then
 * the number uniformly among numbers of that many digits, so short operands are not rare), and
 * the decimal sum as both `answer` (RL) and `completion` (SFT). Every example is a pure function
 * of (seed, split, index) through the counter-based RNG. Test pairs (a, b) never occur in the
 * training split, so the test accuracy is held-out accuracy. */
#ifndef QUILLAN_DATA_TASK_H
#define QUILLAN_DATA_TASK_H

#include "error.h"

#include <stdint.h>

/* Writes DIR/train.jsonl (n_train lines) and DIR/test.jsonl (n_test lines) for task `name`
 * ("addition"), creating DIR if needed. Returns 0, or -1 with err set (QERR_NOTFOUND for an
 * unknown task, QERR_RANGE for counts the task cannot produce, QERR_IO naming the file). */
int data_task_make(const char *name, long n_train, long n_test, uint64_t seed, const char *dir,
                   qerr_t *err);

/* Known task names, NULL-terminated (static storage). */
const char *const *data_task_names(void);

#endif

/* What the end-to-end test programs (tests/e2e/<area>_e2e.c) share: the check macro and its failure
 * count, monotonic time, the files through which a test's processes talk, free loopback ports
 * and child processes.
 *
 * Header-only: every program is an executable of its own that includes this once, so the
 * functions are `static inline` (one a program does not call costs nothing and draws no
 * unused-function warning).
 *
 * Failures of the outside world (a file that cannot be read, a fork that fails, a child that
 * hangs) come back as return values; only a path longer than its buffer, a bug of the test's
 * own set-up, stops the program (Q_ASSERT). */
#ifndef QUILLAN_TESTS_E2E_H
#define QUILLAN_TESTS_E2E_H

#include "error.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Bytes of the path buffers these helpers build (dir/name). */
#define E2E_PATH_MAX 1024

/* ---- checks ---- */

/* Checks that failed so far in this process; a program's main returns non-zero unless it is 0. */
static int e2e_failures;

/* Counts a failed check and prints it on stderr as "FAIL file:line: cond: message" (message:
 * printf-style arguments) without stopping, so that one run reports every broken check. */
#define E2E_CHECK(cond, ...)                                                                       \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            e2e_failures++;                                                                        \
        }                                                                                          \
    } while (0)

/* ---- time ---- */

/* Seconds on the monotonic clock: for time limits, never for a verdict. */
static inline double e2e_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Sleeps s >= 0 seconds; a signal handled by the program ends the sleep early (the programs
 * that stop on SIGTERM look at their flag after it). */
static inline void e2e_sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

/* ---- files ---- */

/* Writes dir/name into out (cap bytes), or name alone when dir is NULL. Every file helper below
 * takes (dir, name) this way. */
static inline void e2e_path_of(char *out, size_t cap, const char *dir, const char *name) {
    int n = dir ? snprintf(out, cap, "%s/%s", dir, name) : snprintf(out, cap, "%s", name);
    Q_ASSERT(n >= 0 && (size_t)n < cap);
}

static inline bool e2e_file_exists(const char *dir, const char *name) {
    char path[E2E_PATH_MAX];
    e2e_path_of(path, sizeof path, dir, name);
    struct stat st;
    return stat(path, &st) == 0;
}

/* The whole of dir/name as it is now (read to its end, so a file another process is still
 * writing gives what is there): malloc'd, owned by the caller, NUL-terminated; its length in
 * bytes, without the NUL, goes to *len when len is not NULL. NULL when the file cannot be opened
 * or read, or memory runs out. */
static inline char *e2e_file_read(const char *dir, const char *name, size_t *len) {
    char path[E2E_PATH_MAX];
    e2e_path_of(path, sizeof path, dir, name);
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf != NULL) {
        n += fread(buf + n, 1, cap - 1 - n, f);
        if (n < cap - 1)
            break; /* the end of the file, or an error (ferror below) */
        char *grown = realloc(buf, cap * 2);
        if (grown == NULL) {
            free(buf);
            buf = NULL;
        } else {
            buf = grown;
            cap *= 2;
        }
    }
    if (buf != NULL && ferror(f)) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf == NULL)
        return NULL;
    buf[n] = '\0';
    if (len)
        *len = n;
    return buf;
}

/* Whether dir/name holds needle; false when it cannot be read. */
static inline bool e2e_file_has(const char *dir, const char *name, const char *needle) {
    char *text = e2e_file_read(dir, name, NULL);
    bool yes = text != NULL && strstr(text, needle) != NULL;
    free(text);
    return yes;
}

/* The number of lines of dir/name that hold needle, or of all its lines when needle is NULL.
 * Only lines ended by '\n' count: a last line without one is still being written. 0 when the
 * file cannot be read. */
static inline size_t e2e_file_lines(const char *dir, const char *name, const char *needle) {
    char *text = e2e_file_read(dir, name, NULL);
    size_t n = 0;
    for (char *line = text, *end; line && (end = strchr(line, '\n')) != NULL; line = end + 1) {
        *end = '\0';
        n += needle == NULL || strstr(line, needle) != NULL;
    }
    free(text);
    return n;
}

/* Appends text to dir/name, created when absent. 0, or -1 when it cannot be written. */
static inline int e2e_file_append(const char *dir, const char *name, const char *text) {
    char path[E2E_PATH_MAX];
    e2e_path_of(path, sizeof path, dir, name);
    FILE *f = fopen(path, "a");
    if (f == NULL)
        return -1;
    int bad = fputs(text, f) == EOF;
    bad |= fclose(f) != 0;
    return bad ? -1 : 0;
}

/* Replaces dir/name with text atomically: it is written to dir/name.tmp and renamed over
 * dir/name, so that a reader sees the old file or the new one, never half of one. 0, or -1 when
 * it cannot be written. */
static inline int e2e_file_put(const char *dir, const char *name, const char *text) {
    char path[E2E_PATH_MAX], tmp[E2E_PATH_MAX + 4];
    e2e_path_of(path, sizeof path, dir, name);
    e2e_path_of(tmp, sizeof tmp, NULL, path);
    strcat(tmp, ".tmp");
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return -1;
    int bad = fputs(text, f) == EOF;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        remove(tmp);
        return -1;
    }
    return 0;
}

/* ---- ports ---- */

/* A TCP port of 127.0.0.1 free when asked: the kernel picks it and it is released at once for
 * the caller to bind (another process could take it in between). -1 when no socket could be
 * bound. */
static inline int e2e_free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int port = -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

/* ---- processes ---- */

/* For use in a forked child: sends stdout to the file out and stderr to the file err (appended,
 * created 0644 when absent; NULL leaves the stream as it is; one path for both shares one file),
 * then executes argv[0] with argv (NULL-terminated). Never returns: when a file cannot be opened
 * or the exec fails it says why on stderr and exits 127, the shell's status for a command that
 * could not run. */
static inline _Noreturn void e2e_exec(char *const argv[], const char *out, const char *err) {
    int fo = -1, fe = -1;
    if (out != NULL && (fo = open(out, O_WRONLY | O_CREAT | O_APPEND, 0644)) < 0) {
        fprintf(stderr, "e2e_exec %s: stdout to %s: %s\n", argv[0], out, strerror(errno));
        _exit(127);
    }
    if (err != NULL && out != NULL && strcmp(err, out) == 0)
        fe = fo;
    else if (err != NULL && (fe = open(err, O_WRONLY | O_CREAT | O_APPEND, 0644)) < 0) {
        fprintf(stderr, "e2e_exec %s: stderr to %s: %s\n", argv[0], err, strerror(errno));
        _exit(127);
    }
    if (fo >= 0)
        dup2(fo, STDOUT_FILENO);
    if (fe >= 0)
        dup2(fe, STDERR_FILENO);
    /* The program gets the files as its stdout and stderr only. */
    if (fo > STDERR_FILENO)
        close(fo);
    if (fe > STDERR_FILENO && fe != fo)
        close(fe);
    execv(argv[0], argv);
    fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

/* Starts argv[0] with argv in a child process, its output as e2e_exec says. Returns the child's
 * pid, which the caller reaps (e2e_wait_exit, e2e_stop or e2e_kill), or -1 when fork fails (errno
 * says why). */
static inline pid_t e2e_spawn(char *const argv[], const char *out, const char *err) {
    pid_t pid = fork();
    if (pid == 0)
        e2e_exec(argv, out, err);
    return pid;
}

/* Whether the child pid is still running. A child that has ended is left unreaped, so that
 * e2e_wait_exit still gets its status. */
static inline bool e2e_alive(pid_t pid) {
    if (pid <= 0)
        return false;
    siginfo_t info;
    memset(&info, 0, sizeof info);
    if (waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT) != 0)
        return false;
    return info.si_pid == 0;
}

/* A waitpid status as a shell reads it: the exit status, or 128 + the number of the signal that
 * ended the process. */
static inline int e2e_exit_code(int status) {
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* Waits up to limit_s seconds for the child pid to end and reaps it. Returns its e2e_exit_code,
 * or -1 when pid is no child of this process, or when it still ran after limit_s: then it is
 * SIGKILLed and reaped, so that no process outlives the test. */
static inline int e2e_wait_exit(pid_t pid, double limit_s) {
    if (pid <= 0)
        return -1;
    double start = e2e_now_s();
    int status = 0;
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            return e2e_exit_code(status);
        if (r < 0 && errno != EINTR)
            return -1;
        if (e2e_now_s() - start >= limit_s)
            break;
        e2e_sleep_s(0.02);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -1;
}

/* Sends SIGTERM to the child pid, then returns e2e_wait_exit(pid, limit_s). */
static inline int e2e_stop(pid_t pid, double limit_s) {
    if (pid <= 0)
        return -1;
    kill(pid, SIGTERM);
    return e2e_wait_exit(pid, limit_s);
}

/* SIGKILLs the child pid and reaps it. Returns its e2e_exit_code (128 + SIGKILL unless it had
 * ended before), or -1 when pid is no child of this process. */
static inline int e2e_kill(pid_t pid) {
    if (pid <= 0)
        return -1;
    kill(pid, SIGKILL);
    int status = 0;
    pid_t r;
    while ((r = waitpid(pid, &status, 0)) < 0 && errno == EINTR)
        continue;
    return r == pid ? e2e_exit_code(status) : -1;
}

#endif

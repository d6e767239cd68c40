/* `quillan launch`: a whole RL run on this machine (ARCHITECTURE.md §1) as child processes of
 * this one: quillan-reward (when a reward service of the config is the built-in one bound
 * here), quillan-learner and N quillan-rollout workers, with the cores split between them.
 *
 * Before anything starts, the config is validated (config_validate, then the run's own rules:
 * RL mode, a training set with at least one batch of examples, a test set that opens) and the
 * binaries are found; every error names the key and where its value came from, and nothing is
 * left behind.
 *
 * The children share a process group of their own, so a Ctrl-C at the terminal reaches only
 * this process, which then stops them in order: SIGINT to each (the learner writes a checkpoint
 * and exits 0; workers and the reward service exit 0), a grace period, then SIGKILL to the
 * group. Each child also gets SIGTERM from the kernel if this process dies (PR_SET_PDEATHSIG),
 * so nothing is orphaned. A child's stdout and stderr go to LOG_DIR/NAME.log; when one dies
 * unexpectedly its last lines are shown and the run stops with exit status 1.
 *
 * Progress comes from the log hub: a SUB socket on network.log_out reads the learner's
 * `learner.step` and `eval` records and the workers' `rollout.group` records, and one line
 * shows step, policy version, reward mean, last eval accuracy, tokens/s and the ETA (redrawn in
 * place on a terminal, a plain line every few seconds otherwise). Records at level warn or
 * error from any process are printed as lines of their own. */
#include "checkpoint.h"
#include "cli.h"
#include "config.h"
#include "jsonl.h"
#include "log.h"
#include "log_codec.h"
#include "net.h"
#include "net_security.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

static const char *const CMD = "quillan launch";

#define LAUNCH_MAX_WORKERS 256
#define LAUNCH_MAX_CHILDREN (LAUNCH_MAX_WORKERS + 2)
#define LAUNCH_GRACE_S_DEFAULT 30.0
#define LAUNCH_PLAIN_INTERVAL_S 5.0 /* progress lines when stdout is not a terminal */
#define LAUNCH_TTY_INTERVAL_S 0.5
#define LAUNCH_TAIL_LINES 15
#define LAUNCH_WARN_REPEAT_S 30.0  /* the same warning of the same process at most this often */
#define LAUNCH_WORKER_STALE_S 60.0 /* a worker's tokens/s older than this no longer counts */

typedef struct {
    const char *config;
    char **sets; /* --set overrides, passed on to every child */
    int nset;
    char **learner_args; /* --learner-arg values, passed on to the learner */
    int nlearner_args;
    long workers;
    int no_learner, no_reward;
    const char *resume;
    const char *log_dir;
    double grace_s;
} launch_opts_t;

typedef struct {
    char name[32];       /* "learner", "rollout-0", "reward" */
    char path[PATH_MAX]; /* the binary */
    char log[PATH_MAX];  /* LOG_DIR/NAME.log */
    char **argv;         /* NULL-terminated, owned */
    int argc;
    pid_t pid; /* 0 before start */
    int running;
    int status;     /* waitpid status once it ended */
    long log_start; /* size of the log before this run: its tail shows only this run */
} child_t;

typedef struct {
    char process[64], event[64];
    double at;
} warn_seen_t;

/* What the progress line shows, from the log hub's records. */
typedef struct {
    int have_step;
    double step, version, reward_mean, eval_acc, learner_tps, rollout_tps;
    double first_step, first_step_at; /* for the ETA: the rate since the first step seen */
    double last_step_at;
    long total_steps;
    struct {
        char process[64];
        double tps, at;
    } workers[LAUNCH_MAX_WORKERS];
    int n_workers;
    warn_seen_t warned[32];
    int n_warned;
} progress_t;

static volatile sig_atomic_t stop_signal;

static void on_signal(int sig) {
    stop_signal = sig;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- arguments ---- */

static void usage(FILE *out) {
    fprintf(out,
            "usage: quillan launch CONFIG [--workers N] [--set section.key=value]... [options]\n"
            "\n"
            "Runs an RL run on this machine: quillan-reward (when a reward.services address is\n"
            "reward.builtin.bind), quillan-learner and N quillan-rollout workers, as child\n"
            "processes, and prints one live progress line (step, policy version, reward, last\n"
            "eval accuracy, tokens/s, ETA). Ctrl-C stops everything cleanly: the learner writes\n"
            "a checkpoint under learner.checkpoint_dir. The config is checked before anything\n"
            "starts. Threads: learner.threads and rollout.threads when set, otherwise the cores\n"
            "are split between the learner and the workers.\n"
            "\n"
            "options:\n"
            "  --workers N        rollout workers on this machine (default 1; 0 = none, for\n"
            "                     workers on other hosts)\n"
            "  --set K=V          override one config key (passed on to every process)\n"
            "  --resume DIR|auto  continue the learner from a checkpoint (auto: the latest\n"
            "                     under learner.checkpoint_dir, if any)\n"
            "  --learner-arg ARG  pass ARG on to quillan-learner (repeatable)\n"
            "  --no-learner       do not start the learner (it runs on another host)\n"
            "  --no-reward        do not start quillan-reward (the services run elsewhere)\n"
            "  --log-dir DIR      where each process's output goes, as NAME.log (default\n"
            "                     learner.checkpoint_dir/logs)\n"
            "  --grace S          seconds the processes get to stop before SIGKILL (default 30)\n"
            "\n"
            "The binaries are looked up next to this `quillan` (an install's bin/, or the build\n"
            "tree: learner/, rollout/, reward/), then on PATH.\n"
            "\n"
            "exit status: 0 the run finished or was stopped cleanly; 1 a bad config, a process\n"
            "that failed or had to be killed; 2 usage error\n");
}

static int is_help(const char *a) {
    return !strcmp(a, "--help") || !strcmp(a, "-h");
}

/* Returns 0, 2 after reporting a usage error, or -1 for --help. */
static int parse_args(int argc, char **argv, launch_opts_t *o) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const int has = i + 1 < argc;
        if (is_help(a))
            return -1;
        if (!strcmp(a, "--set") && has) {
            o->sets[o->nset++] = argv[++i];
        } else if (!strcmp(a, "--learner-arg") && has) {
            o->learner_args[o->nlearner_args++] = argv[++i];
        } else if (!strcmp(a, "--resume") && has) {
            o->resume = argv[++i];
        } else if (!strcmp(a, "--log-dir") && has) {
            o->log_dir = argv[++i];
        } else if (!strcmp(a, "--workers") && has) {
            char *end;
            errno = 0;
            o->workers = strtol(argv[++i], &end, 10);
            if (errno || end == argv[i] || *end || o->workers < 0 ||
                o->workers > LAUNCH_MAX_WORKERS) {
                fprintf(stderr, "%s: --workers expects an integer in [0, %d], got '%s'\n", CMD,
                        LAUNCH_MAX_WORKERS, argv[i]);
                return 2;
            }
        } else if (!strcmp(a, "--grace") && has) {
            char *end;
            errno = 0;
            o->grace_s = strtod(argv[++i], &end);
            if (errno || end == argv[i] || *end || !(o->grace_s >= 0 && o->grace_s <= 86400)) {
                fprintf(stderr, "%s: --grace expects seconds in [0, 86400], got '%s'\n", CMD,
                        argv[i]);
                return 2;
            }
        } else if (!strcmp(a, "--no-learner")) {
            o->no_learner = 1;
        } else if (!strcmp(a, "--no-reward")) {
            o->no_reward = 1;
        } else if (a[0] == '-' || o->config) {
            fprintf(stderr, "%s: unexpected argument '%s'\n", CMD, a);
            return 2;
        } else {
            o->config = a;
        }
    }
    if (!o->config) {
        fprintf(stderr, "%s: missing CONFIG\n", CMD);
        return 2;
    }
    return 0;
}

/* ---- validation ---- */

/* "WHERE: KEY: message", WHERE being the file and line, the --set, or the file for a default. */
static int config_error(const quillan_config_t *cfg, qerr_t *err, const char *key, const char *fmt,
                        ...) __attribute__((format(printf, 4, 5)));
static int config_error(const quillan_config_t *cfg, qerr_t *err, const char *key, const char *fmt,
                        ...) {
    char msg[QERR_MSG_MAX], where[CONFIG_PATH_MAX + 64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    config_origin(cfg, key, where, sizeof where);
    if (!strcmp(where, "default"))
        snprintf(where, sizeof where, "%s (default)", cfg->source);
    return qerr_set(err, QERR_INVALID, "%s: %s: %s", where, key, msg);
}

/* Prefixes err's message with where key's value came from and the key. */
static int config_wrap(const quillan_config_t *cfg, qerr_t *err, const char *key) {
    char where[CONFIG_PATH_MAX + 64];
    config_origin(cfg, key, where, sizeof where);
    if (!strcmp(where, "default"))
        snprintf(where, sizeof where, "%s (default)", cfg->source);
    return qerr_wrap(err, "%s: %s", where, key);
}

/* Loads and validates the config, then the run's own rules. */
static int config_check(const launch_opts_t *o, quillan_config_t *cfg, qerr_t *err) {
    config_defaults(cfg);
    if (config_load(cfg, o->config, err) < 0)
        return -1;
    for (int i = 0; i < o->nset; i++)
        if (config_set(cfg, o->sets[i], err) < 0)
            return -1;
    if (config_validate(cfg, err) < 0)
        return -1;
    if (cfg->learner.mode != CONFIG_MODE_RL)
        return config_error(cfg, err, "learner.mode",
                            "sft: launch runs RL (GRPO/DAPO); for SFT run `quillan sft %s`",
                            o->config);
    if (o->no_learner)
        return 0;
    if (!cfg->data.train[0])
        return config_error(cfg, err, "data.train",
                            "no training set: set it to a JSONL of {prompt, answer}");
    jsonl_reader_t *r = jsonl_reader_new(cfg->data.train, 0, err);
    if (!r)
        return config_wrap(cfg, err, "data.train");
    int rc = jsonl_reader_check(r, JSONL_TASK_RL, err);
    const size_t n = jsonl_reader_count(r);
    jsonl_reader_destroy(&r);
    if (rc < 0)
        return config_wrap(cfg, err, "data.train");
    if ((size_t)cfg->learner.batch_groups > n)
        return config_error(cfg, err, "learner.batch_groups",
                            "%d groups per batch is more than the %zu prompts of data.train (%s)",
                            cfg->learner.batch_groups, n, cfg->data.train);
    if (cfg->data.test[0]) {
        r = jsonl_reader_new(cfg->data.test, 0, err);
        if (!r)
            return config_wrap(cfg, err, "data.test");
        jsonl_reader_destroy(&r);
    } else if (cfg->learner.eval_interval > 0) {
        return config_error(cfg, err, "learner.eval_interval",
                            "%d: evaluating needs a test set in data.test",
                            cfg->learner.eval_interval);
    }
    if (cfg->learner.init_checkpoint[0] && !o->resume) {
        char dir[PATH_MAX];
        if (checkpoint_resolve(cfg->learner.init_checkpoint, dir, sizeof dir, err) < 0)
            return config_wrap(cfg, err, "learner.init_checkpoint");
    }
    return 0;
}

/* Splits "tcp://host:port"; returns 0, or -1 for another transport or form. */
static int endpoint_split(const char *ep, char *host, size_t cap, const char **port) {
    if (strncmp(ep, "tcp://", 6) != 0)
        return -1;
    const char *h = ep + 6, *colon = strrchr(h, ':');
    if (!colon || (size_t)(colon - h) >= cap)
        return -1;
    memcpy(host, h, (size_t)(colon - h));
    host[colon - h] = '\0';
    *port = colon + 1;
    return 0;
}

static int is_local_host(const char *h) {
    return !strcmp(h, "127.0.0.1") || !strcmp(h, "localhost") || !strcmp(h, "[::1]");
}

/* 1 when a client connecting to `connect` reaches a service bound at `bind` on this machine. */
static int endpoint_reaches(const char *bind, const char *connect) {
    if (!strcmp(bind, connect))
        return 1;
    char bh[CONFIG_ADDR_MAX], ch[CONFIG_ADDR_MAX];
    const char *bp, *cp;
    if (endpoint_split(bind, bh, sizeof bh, &bp) < 0 ||
        endpoint_split(connect, ch, sizeof ch, &cp) < 0 || strcmp(bp, cp) != 0)
        return 0;
    const int any = !strcmp(bh, "*") || !strcmp(bh, "0.0.0.0");
    return (any || is_local_host(bh)) && is_local_host(ch);
}

/* ---- binaries ---- */

static int is_executable(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0;
}

/* Finds `name`: next to this executable (an install's bin/), in the build tree
 * (exe/../SUBDIR/), then on PATH. */
static int binary_find(const char *name, const char *subdir, char *out, size_t cap, qerr_t *err) {
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    char dir[PATH_MAX] = "";
    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            snprintf(dir, sizeof dir, "%s", exe);
        }
    }
    if (dir[0]) {
        snprintf(out, cap, "%s/%s", dir, name);
        if (is_executable(out))
            return 0;
        snprintf(out, cap, "%s/../%s/%s", dir, subdir, name);
        if (is_executable(out))
            return 0;
    }
    const char *path = getenv("PATH");
    while (path && *path) {
        const size_t len = strcspn(path, ":");
        if (len > 0 && len < PATH_MAX) {
            snprintf(out, cap, "%.*s/%s", (int)len, path, name);
            if (is_executable(out))
                return 0;
        }
        path += len + (path[len] == ':');
    }
    return qerr_set(err, QERR_NOTFOUND,
                    "%s not found: looked in %s, %s/../%s/ and on PATH (build it with `cmake "
                    "--build BUILD --target %s`)",
                    name, dir[0] ? dir : "(unknown executable directory)", dir, subdir, name);
}

/* ---- children ---- */

static int mkdir_p(const char *path, qerr_t *err) {
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
        return qerr_set(err, QERR_RANGE, "%s: path too long", path);
    for (char *p = buf + 1;; p++) {
        const char c = *p;
        if (c != '/' && c != '\0')
            continue;
        *p = '\0';
        if (mkdir(buf, 0777) < 0 && errno != EEXIST)
            return qerr_set(err, QERR_IO, "cannot create directory %s: %s", buf, strerror(errno));
        *p = c;
        if (c == '\0')
            return 0;
    }
}

/* Appends one argument (copied) to c->argv. */
static int child_arg(child_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int child_arg(child_t *c, const char *fmt, ...) {
    char **grown = realloc(c->argv, (size_t)(c->argc + 2) * sizeof *grown);
    if (!grown)
        return -1;
    c->argv = grown;
    va_list ap;
    va_start(ap, fmt);
    const int rc = vasprintf(&c->argv[c->argc], fmt, ap);
    va_end(ap);
    if (rc < 0)
        return -1;
    c->argv[++c->argc] = NULL;
    return 0;
}

static void child_free(child_t *c) {
    for (int i = 0; i < c->argc; i++)
        free(c->argv[i]);
    free(c->argv);
    c->argv = NULL;
    c->argc = 0;
}

/* Starts c in process group *pgid (0: c leads a new one, whose id goes to *pgid), with stdin
 * from /dev/null and stdout + stderr appended to c->log. */
static int child_start(child_t *c, pid_t *pgid, qerr_t *err) {
    const int fd = open(c->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0666);
    if (fd < 0)
        return qerr_set(err, QERR_IO, "%s: cannot open: %s", c->log, strerror(errno));
    struct stat st;
    c->log_start = fstat(fd, &st) == 0 ? (long)st.st_size : 0;
    /* The learner and the workers share the cores: libgomp's default spin-waiting at barriers
     * then burns a descheduled peer's time slice (measured: 2-thread steps ~25x slower).
     * libgomp reads this once at start-up, so it is set for the children; a user's value wins. */
    setenv("OMP_WAIT_POLICY", "passive", 0);
    const int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid < 0) {
        close(fd);
        if (devnull >= 0)
            close(devnull);
        return qerr_set(err, QERR_IO, "fork for %s: %s", c->name, strerror(errno));
    }
    if (pid == 0) {
        /* Only async-signal-safe calls from here to exec. */
        if (setpgid(0, *pgid) < 0)
            setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(127);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        if (devnull >= 0)
            dup2(devnull, STDIN_FILENO);
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        execv(c->path, c->argv);
        static const char msg[] = "quillan launch: exec failed\n";
        (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
        _exit(127);
    }
    /* Also here, so the group exists before the next child joins it (either call may win). */
    if (setpgid(pid, *pgid) < 0 && *pgid != 0)
        setpgid(pid, pid);
    if (*pgid == 0)
        *pgid = pid;
    close(fd);
    if (devnull >= 0)
        close(devnull);
    c->pid = pid;
    c->running = 1;
    return 0;
}

/* Prints the last LAUNCH_TAIL_LINES lines this run wrote to a child's log, to stderr. */
static void child_tail(const child_t *c) {
    FILE *f = fopen(c->log, "r");
    if (!f) {
        fprintf(stderr, "  (no output: cannot open %s)\n", c->log);
        return;
    }
    char buf[16384];
    fseek(f, 0, SEEK_END);
    const long size = ftell(f);
    long from = size > (long)sizeof buf - 1 ? size - (long)sizeof buf + 1 : 0;
    const int partial = from > c->log_start; /* the first line read may be cut */
    if (from < c->log_start)
        from = c->log_start;
    fseek(f, from, SEEK_SET);
    const size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *text = buf;
    if (partial && strchr(text, '\n'))
        text = strchr(text, '\n') + 1;
    size_t end = strlen(text);
    while (end > 0 && text[end - 1] == '\n')
        text[--end] = '\0';
    if (end == 0) {
        fprintf(stderr, "  (no output in %s)\n", c->log);
        return;
    }
    char *start = text + end;
    for (int lines = 0; start > text; start--)
        if (start[-1] == '\n' && ++lines == LAUNCH_TAIL_LINES)
            break;
    fprintf(stderr, "  last lines of %s:\n", c->log);
    for (char *line = start; line;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        fprintf(stderr, "  | %s\n", line);
        line = nl ? nl + 1 : NULL;
    }
}

static void describe_status(int status, char *buf, size_t cap) {
    if (WIFEXITED(status))
        snprintf(buf, cap, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, cap, "killed by signal %d (%s)", WTERMSIG(status),
                 strsignal(WTERMSIG(status)));
    else
        snprintf(buf, cap, "ended (status 0x%x)", status);
}

/* ---- progress ---- */

static double field(const Quillan__LogRecord *lr, const char *key) {
    for (size_t i = 0; i < lr->n_fields; i++)
        if (!strcmp(lr->fields[i]->key, key))
            return lr->fields[i]->value;
    return NAN;
}

static int progress_worker_slot(progress_t *p, const char *process) {
    for (int i = 0; i < p->n_workers; i++)
        if (!strcmp(p->workers[i].process, process))
            return i;
    if (p->n_workers == LAUNCH_MAX_WORKERS)
        return -1;
    snprintf(p->workers[p->n_workers].process, sizeof p->workers[0].process, "%s", process);
    return p->n_workers++;
}

/* 1 when this warning should be shown (not shown for this process and event recently). */
static int progress_warn_new(progress_t *p, const char *process, const char *event, double t) {
    int slot = -1;
    for (int i = 0; i < p->n_warned; i++)
        if (!strcmp(p->warned[i].process, process) && !strcmp(p->warned[i].event, event)) {
            if (t - p->warned[i].at < LAUNCH_WARN_REPEAT_S)
                return 0;
            slot = i;
        }
    if (slot < 0) {
        slot = p->n_warned < (int)Q_ARRAY_LEN(p->warned) ? p->n_warned++ : 0;
        snprintf(p->warned[slot].process, sizeof p->warned[0].process, "%s", process);
        snprintf(p->warned[slot].event, sizeof p->warned[0].event, "%s", event);
    }
    p->warned[slot].at = t;
    return 1;
}

/* Formats the progress line into buf. */
static void progress_format(const progress_t *p, double t, char *buf, size_t cap) {
    char eval[32] = "-", eta[32] = "-", reward[32] = "-", ver[32] = "-", step[48];
    if (p->have_step)
        snprintf(step, sizeof step, "step %.0f/%ld", p->step, p->total_steps);
    else
        snprintf(step, sizeof step, "step -/%ld (starting)", p->total_steps);
    if (!isnan(p->version))
        snprintf(ver, sizeof ver, "%.0f", p->version);
    if (!isnan(p->reward_mean))
        snprintf(reward, sizeof reward, "%.3f", p->reward_mean);
    if (!isnan(p->eval_acc))
        snprintf(eval, sizeof eval, "%.1f%%", 100.0 * p->eval_acc);
    double rollout = 0;
    int fresh = 0;
    for (int i = 0; i < p->n_workers; i++)
        if (t - p->workers[i].at < LAUNCH_WORKER_STALE_S) {
            rollout += p->workers[i].tps;
            fresh++;
        }
    if (!fresh && !isnan(p->rollout_tps))
        rollout = p->rollout_tps;
    if (p->have_step && p->step > p->first_step && p->last_step_at > p->first_step_at) {
        const double rate = (p->step - p->first_step) / (p->last_step_at - p->first_step_at);
        const double left = ((double)p->total_steps - p->step) / rate;
        const long s = left > 0 ? (long)(left + 0.5) : 0;
        snprintf(eta, sizeof eta, "%ldh%02ldm%02lds", s / 3600, s / 60 % 60, s % 60);
    }
    snprintf(buf, cap, "%s  v%s  reward %s  eval %s  tok/s learner %.0f rollout %.0f  ETA %s", step,
             ver, reward, eval, isnan(p->learner_tps) ? 0.0 : p->learner_tps, rollout, eta);
}

/* Prints a line of its own, clearing the progress line first on a terminal. */
static void print_line(int tty, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void print_line(int tty, const char *fmt, ...) {
    if (tty)
        fputs("\r\033[K", stdout);
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
}

/* Takes in one record from the hub. */
static void progress_record(progress_t *p, const Quillan__LogRecord *lr, double t, int tty,
                            int stopping) {
    if (!strcmp(lr->event, "learner.step")) {
        const double step = field(lr, "step");
        p->step = isnan(step) ? p->step + 1 : step;
        if (!p->have_step) {
            p->first_step = p->step;
            p->first_step_at = t;
        }
        p->have_step = 1;
        p->last_step_at = t;
        double v;
        if (!isnan(v = field(lr, "policy/version")))
            p->version = v;
        if (!isnan(v = field(lr, "reward/mean")))
            p->reward_mean = v;
        if (!isnan(v = field(lr, "perf/learner_tokens_per_s")))
            p->learner_tps = v;
        if (!isnan(v = field(lr, "perf/rollout_tokens_per_s")))
            p->rollout_tps = v;
    } else if (!strcmp(lr->event, "eval")) {
        const double acc = field(lr, "eval/accuracy");
        if (!isnan(acc)) {
            p->eval_acc = acc;
            print_line(tty, "eval at step %.0f: accuracy %.2f%%", p->step, 100.0 * acc);
        }
    } else if (!strcmp(lr->event, "rollout.group")) {
        const double tps = field(lr, "tokens_per_s");
        const int slot = progress_worker_slot(p, lr->process);
        if (slot >= 0 && !isnan(tps)) {
            p->workers[slot].tps = tps;
            p->workers[slot].at = t;
        }
    }
    /* While stopping, peers leaving is what warnings report: only errors are news then. */
    const Quillan__LogLevel least =
        stopping ? QUILLAN__LOG_LEVEL__LOG_LEVEL_ERROR : QUILLAN__LOG_LEVEL__LOG_LEVEL_WARN;
    if (lr->level >= least && progress_warn_new(p, lr->process, lr->event, t))
        print_line(tty, "[%s] %s %s: %s", lr->process,
                   lr->level == QUILLAN__LOG_LEVEL__LOG_LEVEL_WARN ? "warning" : "error", lr->event,
                   lr->text ? lr->text : "");
}

/* ---- the run ---- */

typedef struct {
    child_t children[LAUNCH_MAX_CHILDREN];
    int n;
    pid_t pgid;
    int stopping;   /* SIGINT sent */
    int killed;     /* SIGKILL sent after the grace period or a second Ctrl-C */
    double stop_at; /* when SIGINT was sent */
    int failed;     /* a child died unexpectedly or did not stop cleanly */
    int finished;   /* the learner ended the run by itself */
} run_t;

static child_t *run_add(run_t *r, const char *name, const char *path, const char *log_dir) {
    Q_ASSERT(r->n < LAUNCH_MAX_CHILDREN);
    child_t *c = &r->children[r->n++];
    memset(c, 0, sizeof *c);
    snprintf(c->name, sizeof c->name, "%s", name);
    snprintf(c->path, sizeof c->path, "%s", path);
    snprintf(c->log, sizeof c->log, "%s/%s.log", log_dir, name);
    return c;
}

/* Asks every running child to stop (SIGINT). */
static void run_stop(run_t *r, const char *why, int tty) {
    if (r->stopping)
        return;
    r->stopping = 1;
    r->stop_at = now_s();
    print_line(tty, "%s: %s; stopping every process (SIGINT)", CMD, why);
    for (int i = 0; i < r->n; i++)
        if (r->children[i].running)
            kill(r->children[i].pid, SIGINT);
}

static void run_kill(run_t *r, const char *why, int tty) {
    if (r->killed)
        return;
    r->killed = 1;
    print_line(tty, "%s: %s; killing what is left (SIGKILL)", CMD, why);
    for (int i = 0; i < r->n; i++)
        if (r->children[i].running)
            kill(r->children[i].pid, SIGKILL);
    if (r->pgid > 0)
        killpg(r->pgid, SIGKILL);
}

/* Reaps every child that ended; returns how many are still running. */
static int run_reap(run_t *r, int tty) {
    int running = 0;
    for (int i = 0; i < r->n; i++) {
        child_t *c = &r->children[i];
        if (!c->running)
            continue;
        int status;
        const pid_t w = waitpid(c->pid, &status, WNOHANG);
        if (w == 0 || (w < 0 && errno == EINTR)) {
            running++;
            continue;
        }
        c->running = 0;
        c->status = w < 0 ? 0 : status;
        const int clean = WIFEXITED(c->status) && WEXITSTATUS(c->status) == 0;
        char how[96];
        describe_status(c->status, how, sizeof how);
        if (!r->stopping && clean && !strcmp(c->name, "learner")) {
            r->finished = 1;
            run_stop(r, "the learner finished the run", tty);
        } else if (!r->stopping) {
            r->failed = 1;
            print_line(tty, "%s: %s (pid %d) %s unexpectedly", CMD, c->name, (int)c->pid, how);
            fflush(stdout);
            child_tail(c);
            run_stop(r, "a process died", tty);
        } else if (!clean) {
            r->failed = 1;
            print_line(tty, "%s: %s (pid %d) %s while stopping", CMD, c->name, (int)c->pid, how);
            if (!r->killed) {
                fflush(stdout);
                child_tail(c);
            }
        }
    }
    return running;
}

/* The log hub monitor: a SUB socket on network.log_out. */
static net_socket_t *monitor_new(void *zctx, const quillan_config_t *cfg, qerr_t *err) {
    net_options_t opt;
    net_options_init(&opt);
    opt.linger_ms = 0;
    opt.control_max_msg_bytes = cfg->network.max_msg_bytes;
    net_security_t sec;
    if (net_security_from_config(cfg, NET_ROLE_CLIENT, &sec, err) != 0)
        return NULL;
    net_socket_spec_t spec = {.type = ZMQ_SUB,
                              .protocol = WIRE_PROTOCOL_LOG,
                              .name = "launch-monitor",
                              .sender_id = "quillan-launch",
                              .incarnation_id = net_incarnation_new(),
                              .validate = log_codec_net_validate};
    net_socket_t *s = net_socket_new(zctx, &spec, &opt, &sec, err);
    if (!s)
        return NULL;
    if (zmq_setsockopt(net_socket_handle(s), ZMQ_SUBSCRIBE, "", 0) != 0 ||
        net_socket_connect(s, cfg->network.log_out, err) < 0) {
        if (err && !err->msg[0])
            qerr_set(err, QERR_IO, "subscribe: %s", zmq_strerror(zmq_errno()));
        net_socket_destroy(&s);
        return NULL;
    }
    return s;
}

/* Threads for the learner and each worker: the config's when set (non-zero), otherwise the
 * cores left are split evenly, the learner counting as one more worker. */
static void split_threads(const quillan_config_t *cfg, const launch_opts_t *o, int *learner,
                          int *worker) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (cores < 1)
        cores = 1;
    const long n_workers = o->workers;
    const long users = n_workers + (o->no_learner ? 0 : 1);
    long l = cfg->learner.threads, w = cfg->rollout.threads;
    if (l == 0 && w == 0) {
        l = users ? cores / users : cores;
        w = l;
    } else if (l == 0) {
        l = cores - n_workers * w;
    } else if (w == 0 && n_workers > 0) {
        w = (cores - (o->no_learner ? 0 : l)) / n_workers;
    }
    *learner = l < 1 ? 1 : (int)l;
    *worker = w < 1 ? 1 : (int)w;
}

/* Builds the command lines of every process to start into r. */
static int run_plan(run_t *r, const launch_opts_t *o, const quillan_config_t *cfg,
                    const char *log_dir, qerr_t *err) {
    int start_reward = 0;
    for (int i = 0; i < cfg->reward.n_services && !o->no_reward; i++)
        start_reward |= endpoint_reaches(cfg->reward.builtin.bind, cfg->reward.services[i].address);
    char path[PATH_MAX];
    int lt, wt;
    split_threads(cfg, o, &lt, &wt);
    int rc = 0;
    if (!start_reward && !o->no_reward && cfg->reward.n_services > 0)
        /* Workers would wait on services nobody started: say so instead of a silent stall. */
        fprintf(stderr,
                "%s: not starting quillan-reward: no reward.services address is "
                "reward.builtin.bind (%s); workers wait for the services at %s%s\n",
                CMD, cfg->reward.builtin.bind, cfg->reward.services[0].address,
                cfg->reward.n_services > 1 ? " and the others" : "");
    if (start_reward) {
        if (binary_find("quillan-reward", "reward", path, sizeof path, err) < 0)
            return -1;
        child_t *c = run_add(r, "reward", path, log_dir);
        rc |= child_arg(c, "%s", path) | child_arg(c, "--config") | child_arg(c, "%s", o->config);
        for (int i = 0; i < o->nset; i++)
            rc |= child_arg(c, "--set") | child_arg(c, "%s", o->sets[i]);
    }
    if (!o->no_learner) {
        if (binary_find("quillan-learner", "learner", path, sizeof path, err) < 0)
            return -1;
        child_t *c = run_add(r, "learner", path, log_dir);
        rc |= child_arg(c, "%s", path) | child_arg(c, "--config") | child_arg(c, "%s", o->config);
        for (int i = 0; i < o->nset; i++)
            rc |= child_arg(c, "--set") | child_arg(c, "%s", o->sets[i]);
        if (cfg->learner.threads == 0)
            rc |= child_arg(c, "--set") | child_arg(c, "learner.threads=%d", lt);
        if (o->resume)
            rc |= child_arg(c, "--resume") | child_arg(c, "%s", o->resume);
        for (int i = 0; i < o->nlearner_args; i++)
            rc |= child_arg(c, "%s", o->learner_args[i]);
    }
    if (o->workers > 0 && binary_find("quillan-rollout", "rollout", path, sizeof path, err) < 0)
        return -1;
    for (long k = 0; k < o->workers; k++) {
        char name[32];
        snprintf(name, sizeof name, "rollout-%ld", k);
        child_t *c = run_add(r, name, path, log_dir);
        rc |= child_arg(c, "%s", path) | child_arg(c, "--config") | child_arg(c, "%s", o->config);
        rc |= child_arg(c, "--id") | child_arg(c, "%s", name);
        rc |= child_arg(c, "--threads") | child_arg(c, "%d", wt);
        for (int i = 0; i < o->nset; i++)
            rc |= child_arg(c, "--set") | child_arg(c, "%s", o->sets[i]);
    }
    if (rc)
        return qerr_set(err, QERR_NOMEM, "out of memory");
    if (r->n == 0)
        return qerr_set(err, QERR_INVALID,
                        "nothing to start: --no-learner, no workers and no built-in reward "
                        "service (no reward.services address is reward.builtin.bind %s)",
                        cfg->reward.builtin.bind);
    return 0;
}

/* Runs until the learner finishes, a child dies, or a signal; returns the exit status. */
static int run_loop(run_t *r, const quillan_config_t *cfg, const launch_opts_t *o,
                    net_socket_t *mon) {
    const int tty = isatty(STDOUT_FILENO);
    progress_t p = {.step = 0,
                    .version = NAN,
                    .reward_mean = NAN,
                    .eval_acc = NAN,
                    .learner_tps = NAN,
                    .rollout_tps = NAN,
                    .total_steps = cfg->learner.max_steps > 0 ? cfg->learner.max_steps
                                                              : cfg->learner.total_steps};
    double last_print = 0;
    char line[512];
    for (;;) {
        if (stop_signal) {
            const int sig = stop_signal;
            stop_signal = 0;
            if (r->stopping)
                run_kill(r, "second interrupt", tty);
            else {
                char why[64];
                snprintf(why, sizeof why, "%s received", strsignal(sig));
                run_stop(r, why, tty);
            }
        }
        net_msg_t *m = NULL;
        qerr_t err = {0};
        const int got = net_recv(mon, 100, &m, &err);
        const double t = now_s();
        if (got == 1) {
            progress_record(&p, net_msg_envelope(m)->log_record, t, tty, r->stopping);
            net_msg_destroy(&m);
        }
        const int running = run_reap(r, tty);
        if (r->stopping && running && !r->killed && t - r->stop_at > o->grace_s) {
            char why[96];
            snprintf(why, sizeof why, "%.0f s grace period over", o->grace_s);
            run_kill(r, why, tty);
            r->failed = 1;
        }
        const double every = tty ? LAUNCH_TTY_INTERVAL_S : LAUNCH_PLAIN_INTERVAL_S;
        if (running && !r->stopping && t - last_print >= every) {
            progress_format(&p, t, line, sizeof line);
            if (tty)
                printf("\r\033[K%s", line);
            else
                printf("%s\n", line);
            fflush(stdout);
            last_print = t;
        }
        if (!running)
            break;
    }
    progress_format(&p, now_s(), line, sizeof line);
    print_line(tty, "%s", line);
    if (!r->failed)
        printf("%s: %s; every process stopped cleanly\n", CMD,
               r->finished ? "the run finished" : "the run was stopped");
    return r->failed ? 1 : 0;
}

/* Says where the run's checkpoint is. */
static void report_checkpoint(const quillan_config_t *cfg) {
    char dir[PATH_MAX];
    qerr_t err = {0};
    if (checkpoint_resolve(cfg->learner.checkpoint_dir, dir, sizeof dir, &err) == 0)
        printf("checkpoint: %s\n", dir);
    else
        printf("no checkpoint: %s\n", err.msg);
}

int cli_launch_main(int argc, char **argv) {
    launch_opts_t o = {.workers = 1, .grace_s = LAUNCH_GRACE_S_DEFAULT};
    o.sets = calloc((size_t)argc, sizeof *o.sets);
    o.learner_args = calloc((size_t)argc, sizeof *o.learner_args);
    if (!o.sets || !o.learner_args) {
        free(o.sets);
        free(o.learner_args);
        return 1;
    }
    int rc = parse_args(argc, argv, &o);
    if (rc) {
        usage(rc < 0 ? stdout : stderr);
        free(o.sets);
        free(o.learner_args);
        return rc < 0 ? 0 : 2;
    }
    qerr_t err = {0};
    quillan_config_t *cfg = malloc(sizeof *cfg);
    run_t *r = calloc(1, sizeof *r);
    void *zctx = NULL;
    net_socket_t *mon = NULL;
    char log_dir[PATH_MAX];
    rc = 1;
    if (!cfg || !r) {
        qerr_set(&err, QERR_NOMEM, "out of memory");
        goto fail;
    }
    if (config_check(&o, cfg, &err) < 0)
        goto fail;
    snprintf(log_dir, sizeof log_dir, "%s", o.log_dir ? o.log_dir : cfg->learner.checkpoint_dir);
    if (!o.log_dir)
        strncat(log_dir, "/logs", sizeof log_dir - strlen(log_dir) - 1);
    if (run_plan(r, &o, cfg, log_dir, &err) < 0)
        goto fail;
    if (mkdir_p(log_dir, &err) < 0)
        goto fail;
    zctx = zmq_ctx_new();
    if (!zctx || !(mon = monitor_new(zctx, cfg, &err))) {
        if (!err.msg[0])
            qerr_set(&err, QERR_IO, "zmq_ctx_new: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    /* This process talks to the user; its own records (socket notes) stay off stderr. */
    log_init("quillan-launch");
    log_set_stderr(0);
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    int lt, wt;
    split_threads(cfg, &o, &lt, &wt);
    for (int i = 0; i < r->n; i++) {
        child_t *c = &r->children[i];
        if (child_start(c, &r->pgid, &err) < 0) {
            fprintf(stderr, "%s: %s\n", CMD, err.msg);
            r->failed = 1;
            run_stop(r, "a process could not start", 0);
            break;
        }
        char threads[32] = "";
        if (!strncmp(c->name, "rollout-", 8) || !strcmp(c->name, "learner")) {
            const int n = c->name[0] == 'r' ? wt : lt;
            snprintf(threads, sizeof threads, ", %d thread%s", n, n == 1 ? "" : "s");
        }
        printf("%s: started %s (pid %d%s), output in %s\n", CMD, c->name, (int)c->pid, threads,
               c->log);
    }
    if (!r->stopping)
        printf("%s: progress from the log hub %s; Ctrl-C stops the run and checkpoints\n", CMD,
               cfg->network.log_out);
    fflush(stdout);
    rc = run_loop(r, cfg, &o, mon);
    if (!o.no_learner)
        report_checkpoint(cfg);
    if (rc)
        fprintf(stderr, "%s: the run did not end cleanly (see above)\n", CMD);
    goto done;
fail:
    fprintf(stderr, "%s: %s\n", CMD, err.msg[0] ? err.msg : "out of memory");
    rc = 1;
done:
    net_socket_destroy(&mon);
    if (zctx)
        zmq_ctx_term(zctx);
    for (int i = 0; r && i < r->n; i++)
        child_free(&r->children[i]);
    free(r);
    free(cfg);
    free(o.sets);
    free(o.learner_args);
    return rc;
}

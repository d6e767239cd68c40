/* quillan: the one front door. Dispatches to subcommands; each lives in its own module. */
#include "cli.h"

#include <stdio.h>
#include <string.h>

typedef struct {
    const char *name;
    int (*main)(int argc, char **argv);
    const char *summary;
} command_t;

static const command_t commands[] = {
    {"config", cli_config_main, "check a config file and print the resolved config"},
    {"tokenize", cli_tokenize_main, "encode text to token ids (and decode ids back to text)"},
    {"params", cli_params_main, "print a model's parameter and rollout-size breakdown"},
    {"sft", cli_sft_main, "supervised fine-tuning on prompt/completion pairs"},
    {"data", cli_data_main, "make synthetic datasets (data make-task addition ...)"},
    {"quantize", cli_quantize_main, "quantize a checkpoint into a policy file (.qst)"},
    {"generate", cli_generate_main, "sample completions from a quantized policy"},
    {"eval", cli_eval_main, "accuracy of a policy or checkpoint on a test set (pass@1, pass@k)"},
    {"launch", cli_launch_main, "run learner, rollout workers and reward service on this machine"},
    {"monitor", cli_monitor_main, "live dashboard of a run from the learner's log hub"},
    {"plot", cli_plot_main, "SVG charts of a run's metrics from its JSON-lines log"},
    {"keygen", cli_keygen_main, "write a CurveZMQ key pair (OUT_PREFIX.key, OUT_PREFIX.pub)"},
};

static void usage(FILE *out) {
    fprintf(out, "usage: quillan [--help] [--version] COMMAND [ARGS...]\n\n"
                 "Quillan post-trains a language-model policy with GRPO/DAPO, with rollouts on "
                 "CPUs.\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(out, "\nRun 'quillan COMMAND --help' for the options of a command.\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("quillan %s\n", QUILLAN_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0)
            return commands[i].main(argc - 1, argv + 1);
    fprintf(stderr, "quillan: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}

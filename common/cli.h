/* Subcommands of the `quillan` front door. Each takes the arguments after its own name
 * (argv[0] is the subcommand name) and returns the process exit status: 0 on success, 1 for a
 * runtime failure (bad input, I/O), 2 for a usage error. Every one answers --help. */
#ifndef QUILLAN_CLI_H
#define QUILLAN_CLI_H

int cli_config_main(int argc, char **argv);   /* quillan config check FILE [--set a.b=c]... */
int cli_tokenize_main(int argc, char **argv); /* quillan tokenize [--tokenizer ...] TEXT */
int cli_params_main(int argc, char **argv);   /* quillan params CONFIG */
int cli_sft_main(int argc, char **argv);      /* quillan sft CONFIG [--set a.b=c]... */
int cli_data_main(int argc, char **argv);     /* quillan data make-task TASK --n N --out DIR */
int cli_quantize_main(int argc, char **argv); /* quillan quantize CHECKPOINT -o POLICY.qst */
int cli_generate_main(int argc, char **argv); /* quillan generate POLICY.qst --prompt TEXT */
int cli_eval_main(int argc, char **argv);     /* quillan eval POLICY_OR_CHECKPOINT --data F */
int cli_launch_main(int argc, char **argv);   /* quillan launch CONFIG [--workers N] */
int cli_monitor_main(int argc, char **argv);  /* quillan monitor ADDRESS [--jsonl] */
int cli_plot_main(int argc, char **argv);     /* quillan plot RUN.jsonl -o OUT.svg */
int cli_keygen_main(int argc, char **argv);   /* quillan keygen OUT_PREFIX */

#endif

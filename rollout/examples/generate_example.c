/* Embedding Quillan's inference engine (rollout/quillan.h): load a quantized policy, tokenize a
 * prompt, sample a few completions with their log-probabilities, print them, free everything.
 *
 *   generate_example POLICY.qst "PROMPT" [N]
 *
 * Build against the installed library as you would against llama.h; in this tree the target is
 * `generate_example`. */
#include "quillan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s POLICY.qst PROMPT [N]\n", argv[0]);
        return 2;
    }
    qerr_t err;
    quillan_policy_t *policy = quillan_policy_load_file(argv[1], &err);
    if (!policy) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    int32_t *ids;
    size_t n_ids;
    if (quillan_tokenize(policy, argv[2], strlen(argv[2]), 1, &ids, &n_ids, &err) < 0) {
        fprintf(stderr, "%s\n", err.msg);
        quillan_policy_release(&policy);
        return 1;
    }
    quillan_engine_params_t params;
    quillan_engine_params_default(&params); /* every core, batch 32, routing records on */
    quillan_engine_t *engine = quillan_engine_new(&params, &err);
    quillan_prompt_t prompt = {.prompt_id = 0,
                               .tokens = ids,
                               .n_tokens = (int)n_ids,
                               .n_samples = argc > 3 ? atoi(argv[3]) : 4};
    quillan_sampling_default(&prompt.sampling);
    prompt.sampling.temperature = 0.8f;
    prompt.sampling.max_new_tokens = 32;
    quillan_group_t group;
    int rc = 1;
    if (engine && quillan_generate(engine, policy, &prompt, 1, &group, NULL, NULL, &err) == 0) {
        for (int s = 0; s < group.n_samples; s++) {
            const quillan_sample_t *sm = &group.samples[s];
            double logp = 0;
            for (int k = 0; k < sm->n_tokens; k++)
                logp += sm->logprobs[k];
            char *text = quillan_detokenize(policy, sm->tokens, (size_t)sm->n_tokens, NULL, &err);
            printf("sample %d (%s, log p %.2f): %s%s\n", s, quillan_finish_name(sm->finish), logp,
                   argv[2], text ? text : "?");
            free(text);
        }
        quillan_group_free(&group);
        rc = 0;
    } else {
        fprintf(stderr, "%s\n", err.msg);
    }
    quillan_engine_destroy(&engine);
    free(ids);
    quillan_policy_release(&policy);
    return rc;
}

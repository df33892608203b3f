/*
 * llm_metrics: what the LLM traffic cost, as Prometheus series.
 *
 *   moongate_tokens_total{kind="prompt"|"completion"}   tokens the upstreams reported
 *   moongate_model_requests_total{family="llama"|...}   requests whose usage named a model, by
 *                                                       the model's family (mg_usage_model_family);
 *                                                       past MG_LLM_FAMILIES_MAX families, "other"
 * and, only when the operator asks for them (per_user_max > 0, MOONGATE_METRICS_PER_USER):
 *   moongate_user_requests_total{user}                  every request a user made
 *   moongate_user_prompt_tokens_total{user}
 *   moongate_user_completion_tokens_total{user}
 * with a series for each of the first per_user_max users seen and user="(other)" for the rest
 * (parentheses cannot be in a user id). Each user series costs Prometheus memory for as long as
 * it is kept: a series per user is for hundreds of users, not for a public service's millions.
 *
 * Series are registered the first time they are needed, so memory grows to the bounds above and
 * no further; a lookup is a hash probe (users) or a short scan (families).
 */
#ifndef MOONGATE_LLM_METRICS_H
#define MOONGATE_LLM_METRICS_H

#include "moongate/metrics.h"

#include <stdint.h>

#define MG_LLM_FAMILIES_MAX 32
#define MG_LLM_PER_USER_MAX 10000

typedef struct mg_llm_metrics mg_llm_metrics_t;

/* Registers the families in reg. per_user_max: 0 (off) to MG_LLM_PER_USER_MAX. Returns 0,
   MG_EINVAL or MG_ENOMEM. */
int mg_llm_metrics_new(mg_metrics_t *reg, int per_user_max, mg_llm_metrics_t **out);

/* Frees the table; the series stay with the registry. NULL is a no-op. */
void mg_llm_metrics_free(mg_llm_metrics_t *m);

/*
 * Counts one finished request of user (NULL or "" when it had none): model "" or NULL when not
 * known, token counts < 0 when not known.
 */
void mg_llm_metrics_count(mg_llm_metrics_t *m, const char *user, const char *model,
                          int64_t prompt_tokens, int64_t completion_tokens);

#endif

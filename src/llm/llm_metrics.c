/*
 * The LLM usage series. See llm_metrics.h.
 */
#include "llm_metrics.h"

#include "moongate/error.h"
#include "moongate/settings.h"
#include "usage.h"

#include <stdlib.h>
#include <string.h>

#define OTHER_USER "(other)"

typedef struct family_slot {
    char name[33];
    mg_counter_t *requests;
} family_slot_t;

/* One user's series; an empty name marks a free slot. */
typedef struct user_slot {
    char name[MG_USER_ID_MAX + 1];
    mg_counter_t *requests, *prompt, *completion;
} user_slot_t;

struct mg_llm_metrics {
    mg_metrics_t *reg;
    mg_counter_t *prompt, *completion;
    family_slot_t families[MG_LLM_FAMILIES_MAX];
    int nfamilies;
    mg_counter_t *other_family;
    /* per user: open addressing, at most half full */
    user_slot_t *users;
    size_t cap, nusers, max_users;
    user_slot_t other_user;
};

static int user_series(mg_llm_metrics_t *m, const char *user, user_slot_t *slot)
{
    int rc = mg_metrics_counter(m->reg, "moongate_user_requests_total",
                                "Requests per user (MOONGATE_METRICS_PER_USER).", "user", user,
                                &slot->requests);
    if (rc == 0)
        rc = mg_metrics_counter(m->reg, "moongate_user_prompt_tokens_total",
                                "Prompt tokens per user, as the upstreams reported them.",
                                "user", user, &slot->prompt);
    if (rc == 0)
        rc = mg_metrics_counter(m->reg, "moongate_user_completion_tokens_total",
                                "Completion tokens per user, as the upstreams reported them.",
                                "user", user, &slot->completion);
    return rc;
}

int mg_llm_metrics_new(mg_metrics_t *reg, int per_user_max, mg_llm_metrics_t **out)
{
    *out = NULL;
    if (per_user_max < 0 || per_user_max > MG_LLM_PER_USER_MAX)
        return MG_EINVAL;
    mg_llm_metrics_t *m = calloc(1, sizeof(*m));
    if (m == NULL)
        return MG_ENOMEM;
    m->reg = reg;
    int rc = mg_metrics_counter(reg, "moongate_tokens_total",
                                "Tokens the upstreams reported, by kind.", "kind", "prompt",
                                &m->prompt);
    if (rc == 0)
        rc = mg_metrics_counter(reg, "moongate_tokens_total", NULL, "kind", "completion",
                                &m->completion);
    if (rc == 0)
        rc = mg_metrics_counter(reg, "moongate_model_requests_total",
                                "Requests whose response named a model, by the model's family.",
                                "family", "other", &m->other_family);
    if (rc == 0 && per_user_max > 0) {
        m->max_users = (size_t)per_user_max;
        m->cap = 16;
        while (m->cap < 2 * m->max_users)
            m->cap *= 2;
        m->users = calloc(m->cap, sizeof(*m->users));
        rc = m->users ? user_series(m, OTHER_USER, &m->other_user) : MG_ENOMEM;
        static const char *const names[] = { "moongate_user_requests_total",
                                             "moongate_user_prompt_tokens_total",
                                             "moongate_user_completion_tokens_total" };
        for (size_t i = 0; i < 3 && rc == 0; i++)
            rc = mg_metrics_allow_series(reg, names[i], m->max_users + 1);
    }
    if (rc != 0) {
        mg_llm_metrics_free(m);
        return rc;
    }
    *out = m;
    return 0;
}

void mg_llm_metrics_free(mg_llm_metrics_t *m)
{
    if (m == NULL)
        return;
    free(m->users);
    free(m);
}

static mg_counter_t *family_counter(mg_llm_metrics_t *m, const char *model)
{
    char fam[33];
    mg_usage_model_family(model, fam);
    for (int i = 0; i < m->nfamilies; i++)
        if (strcmp(m->families[i].name, fam) == 0)
            return m->families[i].requests;
    if (m->nfamilies == MG_LLM_FAMILIES_MAX || strcmp(fam, "other") == 0)
        return m->other_family;
    family_slot_t *f = &m->families[m->nfamilies];
    if (mg_metrics_counter(m->reg, "moongate_model_requests_total", NULL, "family", fam,
                           &f->requests) != 0)
        return m->other_family;
    memcpy(f->name, fam, sizeof(fam));
    m->nfamilies++;
    return f->requests;
}

/* FNV-1a: user ids are short and chosen by the operator's policy, not by clients. */
static size_t hash(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return (size_t)h;
}

static user_slot_t *user_slot(mg_llm_metrics_t *m, const char *user)
{
    size_t n = strlen(user);
    if (n > MG_USER_ID_MAX)
        return &m->other_user;
    for (size_t i = hash(user) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        user_slot_t *u = &m->users[i];
        if (strcmp(u->name, user) == 0)
            return u;
        if (u->name[0] != '\0')
            continue;
        /* Not seen before: a slot of its own while there is room. */
        if (m->nusers == m->max_users || user_series(m, user, u) != 0)
            return &m->other_user;
        memcpy(u->name, user, n + 1);
        m->nusers++;
        return u;
    }
}

void mg_llm_metrics_count(mg_llm_metrics_t *m, const char *user, const char *model,
                          int64_t prompt_tokens, int64_t completion_tokens)
{
    if (prompt_tokens > 0)
        mg_counter_add(m->prompt, (uint64_t)prompt_tokens);
    if (completion_tokens > 0)
        mg_counter_add(m->completion, (uint64_t)completion_tokens);
    if (model != NULL && model[0] != '\0')
        mg_counter_inc(family_counter(m, model));
    if (m->users == NULL || user == NULL || user[0] == '\0')
        return;
    user_slot_t *u = user_slot(m, user);
    mg_counter_inc(u->requests);
    if (prompt_tokens > 0)
        mg_counter_add(u->prompt, (uint64_t)prompt_tokens);
    if (completion_tokens > 0)
        mg_counter_add(u->completion, (uint64_t)completion_tokens);
}

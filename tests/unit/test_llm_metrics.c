/*
 * llm_metrics: tokens by kind, requests by model family (bounded), and per user only when
 * asked for, with the users past the bound counted together.
 */
#include "llm/llm_metrics.h"

#include "moongate/error.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The value of sample (name and labels) in the rendered registry, or -1. */
static double sample(mg_metrics_t *reg, const char *name)
{
    mg_strbuf_t sb;
    mg_strbuf_init(&sb, 4 << 20);
    assert_int_equal(mg_metrics_render(reg, &sb), 0);
    char pat[256];
    snprintf(pat, sizeof(pat), "\n%s ", name);
    const char *p = strstr(sb.data, pat);
    double v = p ? atof(p + strlen(pat)) : -1;
    mg_strbuf_free(&sb);
    return v;
}

static void test_tokens_and_families(void **state)
{
    mg_metrics_t *reg = mg_metrics_new();
    mg_llm_metrics_t *m;
    assert_int_equal(mg_llm_metrics_new(reg, 0, &m), 0);
    mg_llm_metrics_count(m, "alice", "llama3.1:8b", 26, 298);
    mg_llm_metrics_count(m, "alice", "Llama-3.3-70B", 4, 6);
    mg_llm_metrics_count(m, "bob", "Qwen/Qwen2.5-7B-Instruct", 10, -1);
    mg_llm_metrics_count(m, "bob", NULL, -1, -1);  /* no usage: counted nowhere */
    mg_llm_metrics_count(m, "bob", "7b", 1, 1);    /* no letters: "other" */
    assert_true(sample(reg, "moongate_tokens_total{kind=\"prompt\"}") == 41);
    assert_true(sample(reg, "moongate_tokens_total{kind=\"completion\"}") == 305);
    assert_true(sample(reg, "moongate_model_requests_total{family=\"llama\"}") == 2);
    assert_true(sample(reg, "moongate_model_requests_total{family=\"qwen\"}") == 1);
    assert_true(sample(reg, "moongate_model_requests_total{family=\"other\"}") == 1);
    /* No per-user series unless asked for. */
    assert_true(sample(reg, "moongate_user_requests_total{user=\"alice\"}") == -1);

    /* Past MG_LLM_FAMILIES_MAX families, the rest are "other". */
    char model[32];
    for (int i = 0; i < MG_LLM_FAMILIES_MAX + 10; i++) {
        snprintf(model, sizeof(model), "fam%c%c", 'a' + i / 26, 'a' + i % 26);
        mg_llm_metrics_count(m, "bob", model, 1, 1);
    }
    assert_true(sample(reg, "moongate_model_requests_total{family=\"famaa\"}") == 1);
    /* llama and qwen took two of the slots */
    assert_true(sample(reg, "moongate_model_requests_total{family=\"other\"}") == 1 + 12);
    mg_llm_metrics_free(m);
    mg_metrics_free(reg);
}

static void test_per_user(void **state)
{
    mg_metrics_t *reg = mg_metrics_new();
    mg_llm_metrics_t *m;
    assert_int_equal(mg_llm_metrics_new(reg, MG_LLM_PER_USER_MAX + 1, &m), MG_EINVAL);
    assert_int_equal(mg_llm_metrics_new(reg, 100, &m), 0);
    char user[32];
    for (int i = 0; i < 150; i++) {
        snprintf(user, sizeof(user), "user%d", i);
        mg_llm_metrics_count(m, user, "llama3", i, 1);
        mg_llm_metrics_count(m, user, NULL, -1, -1);
    }
    mg_llm_metrics_count(m, "", "llama3", 1, 1); /* no user: only the totals */
    assert_true(sample(reg, "moongate_user_requests_total{user=\"user0\"}") == 2);
    assert_true(sample(reg, "moongate_user_prompt_tokens_total{user=\"user99\"}") == 99);
    assert_true(sample(reg, "moongate_user_completion_tokens_total{user=\"user99\"}") == 1);
    assert_true(sample(reg, "moongate_user_requests_total{user=\"user100\"}") == -1);
    /* users 100..149: 50 users, 2 requests each, prompt 100+...+149 */
    assert_true(sample(reg, "moongate_user_requests_total{user=\"(other)\"}") == 100);
    assert_true(sample(reg, "moongate_user_prompt_tokens_total{user=\"(other)\"}") ==
                (100 + 149) * 50 / 2);
    mg_llm_metrics_free(m);
    mg_metrics_free(reg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tokens_and_families),
        cmocka_unit_test(test_per_user),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

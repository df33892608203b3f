/*
 * The man pages (docs/man/moongate.8, docs/man/moongate-agent.1) match the programs: every
 * option that `--help` names (moongate's, moongate-agent's and its setup's) is in the page,
 * and every option the page names is one the program's --help knows. Where groff is
 * installed, each page also renders with no warning.
 */
#include "gwtest.h"

#include <ctype.h>
#include <sys/wait.h>

/* Runs argv with its output in out (malloc'd); returns the exit status. */
static int capture(char *const argv[], char **out)
{
    char dir[MG_TEST_PATH_MAX], path[MG_TEST_PATH_MAX + 16];
    assert_int_equal(mg_test_mkdtemp(dir, sizeof(dir), "mg-man"), 0);
    snprintf(path, sizeof(path), "%s/out", dir);
    mg_test_proc_t p;
    mg_test_spawn_opts_t so = { .stdout_path = path, .stderr_path = path };
    assert_int_equal(mg_test_proc_spawn(&p, argv, &so), 0);
    assert_int_equal(mg_test_proc_wait(&p, 20000), 0);
    assert_int_equal(mg_test_read_file(path, out, NULL), 0);
    return WIFEXITED(p.status) ? WEXITSTATUS(p.status) : -1;
}

/* The page's text with roff's "\-" as "-". */
static char *read_page(const char *name)
{
    char path[MG_TEST_PATH_MAX * 2];
    snprintf(path, sizeof(path), "%s/docs/man/%s", MG_SOURCE_DIR, name);
    char *text = NULL;
    assert_int_equal(mg_test_read_file(path, &text, NULL), 0);
    char *w = text;
    for (const char *r = text; *r; r++) {
        if (r[0] == '\\' && r[1] == '-')
            continue;
        *w++ = *r;
    }
    *w = '\0';
    return text;
}

/* Calls fn for every long option ("--name") in text. */
static void each_long_option(const char *text, void (*fn)(const char *opt, void *arg), void *arg)
{
    for (const char *p = text; (p = strstr(p, "--")) != NULL;) {
        if (p > text && (isalnum((unsigned char)p[-1]) || p[-1] == '-')) {
            p += 2;
            continue;
        }
        char opt[64];
        size_t n = 0;
        for (const char *q = p; n < sizeof(opt) - 1 && (isalnum((unsigned char)*q) || *q == '-');
             q++)
            opt[n++] = *q;
        opt[n] = '\0';
        p += n > 2 ? n : 2;
        if (n > 2)
            fn(opt, arg);
    }
}

typedef struct check {
    const char *other;  /* the text each option must be in */
    const char *where;
    int missing;
} check_t;

static void must_be_in(const char *opt, void *arg)
{
    check_t *c = arg;
    /* "--once" must not pass because "--once-more" is there: look for it followed by a
       non-option character. */
    const char *p = c->other;
    size_t n = strlen(opt);
    while ((p = strstr(p, opt)) != NULL) {
        char next = p[n];
        if (!isalnum((unsigned char)next) && next != '-')
            return;
        p += n;
    }
    print_message("%s is not in %s\n", opt, c->where);
    c->missing++;
}

static void both_ways(const char *help, const char *page, const char *page_name)
{
    check_t a = { .other = page, .where = page_name };
    each_long_option(help, must_be_in, &a);
    check_t b = { .other = help, .where = "--help" };
    each_long_option(page, must_be_in, &b);
    assert_int_equal(a.missing, 0);
    assert_int_equal(b.missing, 0);
}

static void renders_cleanly(const char *name)
{
    if (access("/usr/bin/groff", X_OK) != 0) {
        print_message("groff is not installed: %s not rendered\n", name);
        return;
    }
    char path[MG_TEST_PATH_MAX * 2];
    snprintf(path, sizeof(path), "%s/docs/man/%s", MG_SOURCE_DIR, name);
    char *argv[] = { "/usr/bin/groff", "-man", "-Tutf8", "-ww", "-z", path, NULL };
    char *out = NULL;
    int rc = capture(argv, &out);
    if (rc != 0 || out[0] != '\0')
        fail_msg("groff on %s exited %d:\n%s", name, rc, out);
    free(out);
}

static void test_moongate_page(void **state)
{
    char bin[MG_TEST_PATH_MAX];
    gw_binary(bin, sizeof(bin));
    char *argv[] = { bin, "--help", NULL };
    char *help = NULL;
    assert_int_equal(capture(argv, &help), 0);
    char *page = read_page("moongate.8");
    both_ways(help, page, "moongate.8");
    renders_cleanly("moongate.8");
    free(help);
    free(page);
}

static void test_agent_page(void **state)
{
    char bin[MG_TEST_PATH_MAX];
    gw_program(bin, sizeof(bin), "moongate-agent");
    char *argv1[] = { bin, "--help", NULL };
    char *argv2[] = { bin, "setup", "--help", NULL };
    char *help1 = NULL, *help2 = NULL;
    assert_int_equal(capture(argv1, &help1), 0);
    assert_int_equal(capture(argv2, &help2), 0);
    size_t n = strlen(help1) + strlen(help2) + 2;
    char *help = malloc(n);
    assert_non_null(help);
    snprintf(help, n, "%s\n%s", help1, help2);
    char *page = read_page("moongate-agent.1");
    both_ways(help, page, "moongate-agent.1");
    renders_cleanly("moongate-agent.1");
    free(help);
    free(help1);
    free(help2);
    free(page);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_moongate_page),
        cmocka_unit_test(test_agent_page),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    mg_test_cleanup_all();
    return rc;
}

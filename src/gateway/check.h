/*
 * check: `moongate -t`, the start-up checks (check.c says which).
 */
#ifndef MOONGATE_CHECK_H
#define MOONGATE_CHECK_H

#include <stdio.h>

/*
 * Checks the settings in the environment, the listen address (listen, as -l gives it, or
 * MOONGATE_LISTEN), TLS, the policy file (NULL: the built-in one) and the default route's
 * files. What passes goes to ok, each problem to bad with what to do. Returns 0 when there
 * is none, else 1.
 */
int mg_check_run(const char *policy, const char *listen, FILE *ok, FILE *bad);

#endif

/*
 * Process metrics, named and typed as Prometheus client libraries export them, so dashboards
 * written for those work here: read from the kernel at scrape time, each a few system calls.
 */
#include "moongate/metrics.h"

#include "moongate/error.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <unistd.h>

static double start_time;

static double cpu_seconds(void *arg)
{
    (void)arg;
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* Field i (0: size, 1: resident) of /proc/self/statm, in bytes. */
static double statm(int i)
{
    int fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    char buf[128];
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    unsigned long long size = 0, resident = 0;
    if (sscanf(buf, "%llu %llu", &size, &resident) != 2)
        return 0;
    return (double)(i == 0 ? size : resident) * (double)sysconf(_SC_PAGESIZE);
}

static double resident_bytes(void *arg)
{
    (void)arg;
    return statm(1);
}

static double virtual_bytes(void *arg)
{
    (void)arg;
    return statm(0);
}

static double open_fds(void *arg)
{
    (void)arg;
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        return 0;
    double n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the directory's own */
}

static double max_fds(void *arg)
{
    (void)arg;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return 0;
    return (double)rl.rlim_cur;
}

static double started(void *arg)
{
    (void)arg;
    return start_time;
}

static double one(void *arg)
{
    (void)arg;
    return 1;
}

int mg_process_metrics_init(mg_metrics_t *reg, const char *version)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    start_time = (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
    int rc = mg_metrics_counter_fn(reg, "process_cpu_seconds_total",
                                   "CPU time the process has used, user and system, in seconds.", NULL,
                                   NULL, cpu_seconds, NULL);
    if (rc == 0)
        rc = mg_metrics_gauge_fn(reg, "process_resident_memory_bytes",
                                 "Memory the process holds in RAM, in bytes.", NULL, NULL, resident_bytes,
                                 NULL);
    if (rc == 0)
        rc = mg_metrics_gauge_fn(reg, "process_virtual_memory_bytes",
                                 "The process's address space, in bytes.", NULL, NULL, virtual_bytes,
                                 NULL);
    if (rc == 0)
        rc = mg_metrics_gauge_fn(reg, "process_open_fds", "File descriptors the process has open.",
                                 NULL, NULL, open_fds, NULL);
    if (rc == 0)
        rc = mg_metrics_gauge_fn(reg, "process_max_fds",
                                 "File descriptors the process may open (its soft limit).", NULL, NULL,
                                 max_fds, NULL);
    if (rc == 0)
        rc = mg_metrics_gauge_fn(reg, "process_start_time_seconds",
                                 "When the gateway started, in seconds since the Unix epoch.", NULL,
                                 NULL, started, NULL);
    if (rc == 0)
        rc = mg_metrics_gauge_fn(reg, "moongate_build_info",
                                 "The running moongate's version; always 1.", "version",
                                 version, one, NULL);
    return rc;
}

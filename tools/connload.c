/* connload: new TCP connections at a fixed offered rate (open loop) or as fast as a fixed number
 * in flight allows (closed loop), timing each one. The benchmarks' load generator: Python starts
 * it and reads its output afterwards, never sits in the measured path (issue 9).
 *
 *   connload --target IP:PORT[,IP:PORT...] --duration SECONDS [--rate R] [--concurrency C]
 *            [--threads T] [--mode http|connect] [--timeout MS] [--max-connections N]
 *            [--samples FILE] [--json]
 *
 * Why not wrk alone: wrk gives the maximum rate of a closed loop, but neither a fixed offered
 * rate nor the time a connect() takes, which is what a load balancer adds to a new connection.
 *
 * Open loop (--rate R > 0): connection g (0, 1, 2, ...) is scheduled at t0 + g/R and started
 * when its time comes, whatever else is in flight, up to --concurrency in flight. When that cap
 * is hit the connection is "capped": it starts as soon as a slot frees, and its latency from
 * schedule still counts from its scheduled time, so a slow server cannot hide behind a client
 * that waited for it (coordinated omission). Closed loop (--rate 0): --concurrency connections
 * always in flight, each started when another ends; its rate is the maximum.
 *
 * A connection: non-blocking socket, connect(), epoll until writable (connect time: from the
 * connect() call to established). --mode http (the default) then sends one "Connection: close"
 * GET and reads to EOF (request time: connect() call to EOF); the response must start with
 * "HTTP/1.1 200". The server closes first, so TIME_WAIT stays on the server (as with wrk and
 * nginx) and the client's ports are free again at once. --mode connect closes right after the
 * connection is established, writing nothing; there the client closes first and keeps the
 * TIME_WAIT (60 s). Linux's connect() tries the even half of the ephemeral range first (14,116
 * ports of 32768-60999): once TIME_WAIT fills it, every connect() scans it, milliseconds of system
 * CPU each (measured: 495/s instead of 10,000/s). So connect mode (and wrk, which closes first on
 * some "Connection: close" responses) must stay under ~200 connections/s per client address, or
 * run last. Every connection, and the whole connection in http
 * mode, has --timeout ms (2000) from its connect() call; then it counts as "timeout".
 *
 * T threads (--threads, 1) each run their own epoll loop over their share: thread i takes the
 * connections g = i, i+T, i+2T, ... of the one global schedule, and C/T of the in-flight cap.
 * Targets are taken round robin by g. The run stops starting connections at --duration or after
 * --max-connections, whichever comes first, waits at most --timeout for the ones in flight, and
 * exits.
 *
 * Output: a summary (one JSON line with --json) whose percentiles are exact (nearest rank over
 * all samples, sorted), never from a histogram; with --samples FILE every connection as a text
 * line (header in the file). Build: gcc -O2 -Wall -Wextra -pthread tools/connload.c -lm
 * (make bench-tools builds build/connload).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define STATUS_LEN 12                        /* strlen("HTTP/1.1 200") */
static const char REQUEST[] = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
static const char STATUS_OK[] = "HTTP/1.1 200";

/* How a connection ended; the names are the JSON keys and the samples file's last column. */
enum outcome { OK, REFUSED, TIMEOUT, RESET, BAD_RESPONSE, ADDRNOTAVAIL, OTHER, N_OUTCOMES };
static const char *const OUTCOME_NAMES[N_OUTCOMES] = {
    "ok", "refused", "timeout", "reset", "bad_response", "addrnotavail", "other"};

enum mode { MODE_HTTP, MODE_CONNECT };

struct target {
    struct sockaddr_storage addr;
    socklen_t len;
    char text[64];
};

/* The run's settings, read by every thread, written only before they start. */
struct config {
    struct target *targets;
    unsigned n_targets;
    double duration_s;
    double rate;                 /* connections per second; 0: closed loop */
    unsigned concurrency;
    unsigned threads;
    enum mode mode;
    uint64_t timeout_ns;
    uint64_t max_connections;    /* 0: no limit */
    const char *samples_path;
    int json;
};

/* One finished connection. Times are ns after t0 (the run's start); connect_ns and done_ns are
 * 0 when the connection never got that far. */
struct sample {
    uint64_t sched_ns;           /* when the schedule wanted it started */
    uint64_t start_ns;           /* the connect() call */
    uint64_t connect_ns;         /* established (0: never) */
    uint64_t done_ns;            /* http: EOF after a 200; connect: established (0: failed) */
    uint64_t end_ns;             /* when it ended, whatever the outcome */
    uint32_t target;
    uint16_t outcome;
    uint16_t err;                /* errno of the failure (0 if none) */
};

enum conn_state { FREE, CONNECTING, SENDING, READING };

/* A connection in flight. Each thread's in-flight connections form a list in start order; as
 * every connection gets the same timeout, the head is the first to expire. */
struct conn {
    int fd;
    enum conn_state state;
    uint64_t sched_ns, start_ns, connect_ns;
    uint32_t target;
    size_t sent;
    size_t got;                  /* response bytes read so far */
    char status[STATUS_LEN];     /* the first bytes of the response */
    struct conn *prev, *next;    /* the in-flight list, oldest first */
    struct conn *free_next;
};

struct samples {
    struct sample *v;
    size_t n, cap;
};

struct worker {
    const struct config *cfg;
    unsigned index;
    unsigned cap;                /* this thread's share of --concurrency */
    int epfd;
    struct conn *conns;
    struct conn *free_list;
    struct conn *oldest, *newest;
    unsigned in_flight;
    uint64_t capped;             /* connections that waited for a free slot */
    uint64_t started;
    uint64_t stop_ns;            /* when this thread stopped starting connections */
    struct samples samples;
    pthread_t thread;
    int failed;                  /* an internal error (epoll, memory) stopped this thread */
};

static uint64_t t0_abs;                      /* CLOCK_MONOTONIC ns of the run's start */
static atomic_uint_fast64_t closed_next;     /* closed loop: the next global connection number */

static uint64_t now_abs(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t now_rel(void) { return now_abs() - t0_abs; }

/* Open loop: when connection g is due, ns after t0. */
static uint64_t schedule_ns(const struct config *cfg, uint64_t g) {
    return (uint64_t)((double)g * 1e9 / cfg->rate);
}

static void die(const char *fmt, const char *arg) {
    fprintf(stderr, "connload: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n");
    exit(2);
}

/* --- targets and arguments ------------------------------------------------------------------ */

/* "IP:PORT" or "[IPv6]:PORT". */
static int parse_target(const char *text, struct target *t) {
    char host[64];
    const char *colon;
    memset(t, 0, sizeof(*t));
    snprintf(t->text, sizeof(t->text), "%s", text);
    if (text[0] == '[') {
        const char *close = strchr(text, ']');
        if (!close || close[1] != ':' || (size_t)(close - text - 1) >= sizeof(host))
            return -1;
        memcpy(host, text + 1, (size_t)(close - text - 1));
        host[close - text - 1] = 0;
        colon = close + 1;
    } else {
        colon = strrchr(text, ':');
        if (!colon || (size_t)(colon - text) >= sizeof(host))
            return -1;
        memcpy(host, text, (size_t)(colon - text));
        host[colon - text] = 0;
    }
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || colon[1] == 0 || port < 1 || port > 65535)
        return -1;
    struct sockaddr_in *v4 = (struct sockaddr_in *)&t->addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&t->addr;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        t->len = sizeof(*v4);
    } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        t->len = sizeof(*v6);
    } else {
        return -1;
    }
    return 0;
}

static void parse_targets(const char *list, struct config *cfg) {
    char *copy = strdup(list), *save = NULL;
    unsigned n = 1;
    for (const char *p = list; *p; p++)
        n += *p == ',';
    cfg->targets = calloc(n, sizeof(struct target));
    if (!copy || !cfg->targets)
        die("%s", "out of memory");
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (parse_target(tok, &cfg->targets[cfg->n_targets]) != 0)
            die("bad target '%s' (IP:PORT or [IPv6]:PORT)", tok);
        cfg->n_targets++;
    }
    free(copy);
    if (cfg->n_targets == 0)
        die("%s", "--target needs at least one IP:PORT");
}

static double parse_number(const char *text, const char *option, double min) {
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (errno || *end || text[0] == 0 || !isfinite(v) || v < min) {
        char msg[128];
        snprintf(msg, sizeof(msg), "%s wants a number >= %g, not '%%s'", option, min);
        die(msg, text);
    }
    return v;
}

static void usage(FILE *out) {
    fprintf(out,
            "usage: connload --target IP:PORT[,IP:PORT...] --duration SECONDS [--rate R]\n"
            "                [--concurrency C] [--threads T] [--mode http|connect] [--timeout MS]\n"
            "                [--max-connections N] [--samples FILE] [--json]\n"
            "  --rate R            connections/s on a fixed schedule (open loop); 0: closed loop (default 0)\n"
            "  --concurrency C     most connections in flight (default 64)\n"
            "  --threads T         epoll loops, each with 1/T of the rate and of C (default 1)\n"
            "  --mode http|connect GET and read to EOF (default), or close once established\n"
            "  --timeout MS        per connection, from its connect() call (default 2000)\n"
            "  --max-connections N stop after starting N connections\n"
            "  --samples FILE      every connection, one text line each\n"
            "  --json              the summary as one JSON line\n");
}

static void parse_args(int argc, char **argv, struct config *cfg) {
    static const struct option options[] = {
        {"target", required_argument, NULL, 'a'},
        {"duration", required_argument, NULL, 'd'},
        {"rate", required_argument, NULL, 'r'},
        {"concurrency", required_argument, NULL, 'c'},
        {"threads", required_argument, NULL, 't'},
        {"mode", required_argument, NULL, 'm'},
        {"timeout", required_argument, NULL, 'o'},
        {"max-connections", required_argument, NULL, 'n'},
        {"samples", required_argument, NULL, 's'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *targets = NULL;
    int have_duration = 0, opt;
    memset(cfg, 0, sizeof(*cfg));
    cfg->concurrency = 64;
    cfg->threads = 1;
    cfg->timeout_ns = 2000ull * 1000000ull;
    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (opt) {
        case 'a': targets = optarg; break;
        case 'd': cfg->duration_s = parse_number(optarg, "--duration", 0); have_duration = 1; break;
        case 'r': cfg->rate = parse_number(optarg, "--rate", 0); break;
        case 'c': cfg->concurrency = (unsigned)parse_number(optarg, "--concurrency", 1); break;
        case 't': cfg->threads = (unsigned)parse_number(optarg, "--threads", 1); break;
        case 'o': cfg->timeout_ns = (uint64_t)(parse_number(optarg, "--timeout", 1) * 1e6); break;
        case 'n': cfg->max_connections = (uint64_t)parse_number(optarg, "--max-connections", 1); break;
        case 's': cfg->samples_path = optarg; break;
        case 'j': cfg->json = 1; break;
        case 'm':
            if (strcmp(optarg, "http") == 0)
                cfg->mode = MODE_HTTP;
            else if (strcmp(optarg, "connect") == 0)
                cfg->mode = MODE_CONNECT;
            else
                die("--mode is http or connect, not '%s'", optarg);
            break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); exit(2);
        }
    }
    if (optind < argc)
        die("unexpected argument '%s'", argv[optind]);
    if (!targets)
        die("%s", "--target IP:PORT is required");
    if (!have_duration)
        die("%s", "--duration SECONDS is required (the run is always bounded)");
    if (cfg->threads > cfg->concurrency)
        die("%s", "--threads must not exceed --concurrency (each thread needs a slot)");
    if (cfg->threads > 64)
        die("%s", "--threads is at most 64");
    parse_targets(targets, cfg);
}

/* --- connections ---------------------------------------------------------------------------- */

static enum outcome outcome_of(int err) {
    switch (err) {
    case ECONNREFUSED: return REFUSED;
    case ETIMEDOUT: return TIMEOUT;
    case ECONNRESET: case EPIPE: return RESET;
    case EADDRNOTAVAIL: return ADDRNOTAVAIL;
    default: return OTHER;
    }
}

static int record(struct worker *w, const struct sample *s) {
    struct samples *ss = &w->samples;
    if (ss->n == ss->cap) {
        size_t cap = ss->cap ? ss->cap * 2 : 4096;
        struct sample *v = realloc(ss->v, cap * sizeof(*v));
        if (!v)
            return -1;
        ss->v = v;
        ss->cap = cap;
    }
    ss->v[ss->n++] = *s;
    return 0;
}

static void unlink_conn(struct worker *w, struct conn *c) {
    if (c->prev) c->prev->next = c->next; else w->oldest = c->next;
    if (c->next) c->next->prev = c->prev; else w->newest = c->prev;
    c->prev = c->next = NULL;
}

/* Ends connection c with outcome o (err: its errno), records it and frees its slot. */
static void finish(struct worker *w, struct conn *c, enum outcome o, int err, uint64_t done_ns) {
    uint64_t end = now_rel();
    struct sample s = {
        .sched_ns = c->sched_ns, .start_ns = c->start_ns, .connect_ns = c->connect_ns,
        .done_ns = o == OK ? done_ns : 0, .end_ns = end, .target = c->target,
        .outcome = (uint16_t)o, .err = (uint16_t)err,
    };
    if (c->fd >= 0)
        close(c->fd);              /* close() also takes it out of the epoll set */
    c->fd = -1;
    c->state = FREE;
    unlink_conn(w, c);
    c->free_next = w->free_list;
    w->free_list = c;
    w->in_flight--;
    if (record(w, &s) != 0)
        w->failed = 1;
}

/* Starts connection number g, scheduled at sched_ns, in a free slot. */
static void start(struct worker *w, uint64_t g, uint64_t sched_ns) {
    const struct config *cfg = w->cfg;
    struct conn *c = w->free_list;
    w->free_list = c->free_next;
    const struct target *t = &cfg->targets[g % cfg->n_targets];
    memset(c, 0, sizeof(*c));
    c->sched_ns = sched_ns;
    c->target = (uint32_t)(g % cfg->n_targets);
    c->state = CONNECTING;
    c->prev = w->newest;
    if (w->newest) w->newest->next = c; else w->oldest = c;
    w->newest = c;
    w->in_flight++;
    w->started++;

    c->fd = socket(t->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    c->start_ns = now_rel();
    if (c->fd < 0) {
        int err = errno;
        finish(w, c, outcome_of(err), err, 0);
        return;
    }
    c->start_ns = now_rel();
    int rc = connect(c->fd, (const struct sockaddr *)&t->addr, t->len);
    if (rc != 0 && errno != EINPROGRESS) {
        int err = errno;
        finish(w, c, outcome_of(err), err, 0);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, c->fd, &ev) != 0) {
        int err = errno;
        finish(w, c, OTHER, err, 0);
    }
}

static void on_established(struct worker *w, struct conn *c) {
    c->connect_ns = now_rel();
    if (w->cfg->mode == MODE_CONNECT) {
        finish(w, c, OK, 0, c->connect_ns);
        return;
    }
    c->state = SENDING;
}

/* Writes what is left of the request; on EAGAIN waits for EPOLLOUT again. */
static void send_request(struct worker *w, struct conn *c) {
    while (c->sent < sizeof(REQUEST) - 1) {
        ssize_t n = send(c->fd, REQUEST + c->sent, sizeof(REQUEST) - 1 - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            int err = errno;
            finish(w, c, outcome_of(err), err, 0);
            return;
        }
        c->sent += (size_t)n;
    }
    c->state = READING;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(w->epfd, EPOLL_CTL_MOD, c->fd, &ev) != 0) {
        int err = errno;
        finish(w, c, OTHER, err, 0);
    }
}

/* Reads the response to EOF; only its status line is kept. */
static void read_response(struct worker *w, struct conn *c) {
    char buf[16384];
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof(buf), 0);
        if (n > 0) {
            if (c->got < STATUS_LEN) {
                size_t take = (size_t)n < STATUS_LEN - c->got ? (size_t)n : STATUS_LEN - c->got;
                memcpy(c->status + c->got, buf, take);
            }
            c->got += (size_t)n;
            continue;
        }
        if (n == 0) {
            uint64_t done = now_rel();
            int good = c->got >= STATUS_LEN && memcmp(c->status, STATUS_OK, STATUS_LEN) == 0;
            finish(w, c, good ? OK : BAD_RESPONSE, 0, done);
            return;
        }
        if (errno == EAGAIN || errno == EINTR)
            return;
        int err = errno;
        finish(w, c, outcome_of(err), err, 0);
        return;
    }
}

static void on_event(struct worker *w, struct conn *c, uint32_t events) {
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof(err);
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
            err = errno;
        if (err == 0 && (events & (EPOLLERR | EPOLLHUP)))
            err = ECONNRESET;
        if (err != 0) {
            finish(w, c, outcome_of(err), err, 0);
            return;
        }
        on_established(w, c);
        if (c->state != SENDING)
            return;
    }
    if (c->state == SENDING) {
        send_request(w, c);
        return;
    }
    if (c->state == READING)
        read_response(w, c);
}

/* Times out every connection whose deadline has passed (the list is in start order). */
static void expire(struct worker *w, uint64_t now) {
    while (w->oldest && w->oldest->start_ns + w->cfg->timeout_ns <= now)
        finish(w, w->oldest, TIMEOUT, 0, 0);
}

/* --- the loop ------------------------------------------------------------------------------- */

static void *run_worker(void *arg) {
    struct worker *w = arg;
    const struct config *cfg = w->cfg;
    const int open_loop = cfg->rate > 0;
    const uint64_t duration_ns = (uint64_t)(cfg->duration_s * 1e9);
    const uint64_t T = cfg->threads;
    struct epoll_event events[MAX_EVENTS];
    uint64_t k = 0;                /* open loop: this thread's next connection, g = k*T + index */
    int stopped = 0, waiting = 0;  /* waiting: the next connection is due and found no slot */

    while (now_abs() < t0_abs) {   /* every thread starts at t0 */
        struct timespec ts = {.tv_sec = (time_t)(t0_abs / 1000000000ull),
                              .tv_nsec = (long)(t0_abs % 1000000000ull)};
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
    }

    for (;;) {
        uint64_t now = now_rel();
        uint64_t wake = UINT64_MAX;    /* when the loop must look again, ns after t0 */

        if (!stopped && open_loop) {
            for (;;) {
                uint64_t g = k * T + w->index;
                uint64_t sched = schedule_ns(cfg, g);
                if (sched >= duration_ns || (cfg->max_connections && g >= cfg->max_connections)) {
                    stopped = 1;
                    w->stop_ns = now;
                    break;
                }
                if (sched > now) {
                    wake = sched;
                    break;
                }
                if (w->in_flight >= w->cap) {
                    if (!waiting) {
                        waiting = 1;
                        w->capped++;
                    }
                    break;                 /* a slot frees on an event or a timeout */
                }
                waiting = 0;
                start(w, g, sched);
                k++;
                now = now_rel();
            }
        } else if (!stopped) {
            while (w->in_flight < w->cap && now < duration_ns) {
                uint64_t g = atomic_fetch_add(&closed_next, 1);
                if (cfg->max_connections && g >= cfg->max_connections) {
                    stopped = 1;
                    w->stop_ns = now;
                    break;
                }
                start(w, g, now);
                now = now_rel();
            }
            wake = duration_ns;
        }
        /* Connections due but still waiting for a slot at the end are not started: "unstarted". */
        if (!stopped && now >= duration_ns) {
            stopped = 1;
            w->stop_ns = duration_ns;
        }
        if (w->failed)
            break;
        if (stopped && w->in_flight == 0)
            break;
        if (stopped)
            wake = UINT64_MAX;     /* only the in-flight connections' deadlines matter now */
        if (w->oldest) {
            uint64_t deadline = w->oldest->start_ns + cfg->timeout_ns;
            if (deadline < wake)
                wake = deadline;
        }
        now = now_rel();
        struct timespec timeout = {0, 0};
        if (wake == UINT64_MAX)
            timeout.tv_sec = 1;    /* cannot happen with connections in flight; a safe bound */
        else if (wake > now) {
            uint64_t d = wake - now;
            timeout.tv_sec = (time_t)(d / 1000000000ull);
            timeout.tv_nsec = (long)(d % 1000000000ull);
        }
        int n = epoll_pwait2(w->epfd, events, MAX_EVENTS, &timeout, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("connload: epoll_pwait2");
            w->failed = 1;
            break;
        }
        for (int i = 0; i < n; i++)
            on_event(w, events[i].data.ptr, events[i].events);
        expire(w, now_rel());
    }
    /* Only an internal failure leaves connections here; they count as timeouts, never lost. */
    while (w->oldest)
        finish(w, w->oldest, TIMEOUT, 0, 0);
    return NULL;
}

/* --- statistics and output ------------------------------------------------------------------ */

struct stats {
    size_t n;
    double min, p50, p90, p99, p999, max, mean;
};

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Exact percentiles of values (ns, sorted in place), in µs: nearest rank, the smallest value with
 * at least p% of the samples at or below it. */
static struct stats summarize(uint64_t *v, size_t n) {
    struct stats s = {0};
    s.n = n;
    if (n == 0)
        return s;
    qsort(v, n, sizeof(*v), cmp_u64);
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += (double)v[i];
    const double ps[4] = {50, 90, 99, 99.9};
    double *out[4] = {&s.p50, &s.p90, &s.p99, &s.p999};
    for (int i = 0; i < 4; i++) {
        size_t rank = (size_t)ceil(ps[i] / 100.0 * (double)n - 1e-9);
        if (rank < 1) rank = 1;
        *out[i] = (double)v[rank - 1] / 1e3;
    }
    s.min = (double)v[0] / 1e3;
    s.max = (double)v[n - 1] / 1e3;
    s.mean = sum / (double)n / 1e3;
    return s;
}

static void print_stats_json(const char *name, const struct stats *s, int last) {
    if (s->n == 0) {
        printf("\"%s\":{\"n\":0}%s", name, last ? "" : ",");
        return;
    }
    printf("\"%s\":{\"n\":%zu,\"min\":%.3f,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"p999\":%.3f,"
           "\"max\":%.3f,\"mean\":%.3f}%s",
           name, s->n, s->min, s->p50, s->p90, s->p99, s->p999, s->max, s->mean, last ? "" : ",");
}

static void print_stats_text(const char *name, const struct stats *s) {
    if (s->n == 0) {
        printf("%-22s -\n", name);
        return;
    }
    printf("%-22s p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f  mean %.1f  (n %zu)\n", name,
           s->p50, s->p90, s->p99, s->p999, s->max, s->mean, s->n);
}

static int cmp_sample(const void *a, const void *b) {
    const struct sample *x = a, *y = b;
    if (x->sched_ns != y->sched_ns)
        return (x->sched_ns > y->sched_ns) - (x->sched_ns < y->sched_ns);
    return (x->start_ns > y->start_ns) - (x->start_ns < y->start_ns);
}

static double us(uint64_t ns) { return (double)ns / 1e3; }

/* One line per connection, in schedule order; -1 where a connection never got that far. */
static int write_samples(const char *path, enum mode mode, struct sample *all, size_t n) {
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fprintf(f, "# connload samples: times in us; sched/start/end after t0, connect and request "
               "from the connect() call (request: http mode only), -1 if not reached\n");
    fprintf(f, "# sched_us start_us connect_us request_us end_us target outcome errno\n");
    for (size_t i = 0; i < n; i++) {
        const struct sample *s = &all[i];
        double c = s->connect_ns ? us(s->connect_ns - s->start_ns) : -1;
        double r = s->done_ns && mode == MODE_HTTP ? us(s->done_ns - s->start_ns) : -1;
        fprintf(f, "%.3f %.3f %.3f %.3f %.3f %u %s %u\n", us(s->sched_ns), us(s->start_ns), c, r,
                us(s->end_ns), s->target, OUTCOME_NAMES[s->outcome], s->err);
    }
    return fclose(f) == 0 ? 0 : -1;
}

static void raise_fd_limit(unsigned concurrency) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    if (rl.rlim_cur < (rlim_t)concurrency + 64 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv) {
    struct config cfg;
    parse_args(argc, argv, &cfg);
    raise_fd_limit(cfg.concurrency);
    signal(SIGPIPE, SIG_IGN);
    /* The kernel may defer a timed wakeup by the timer slack (50 us by default), which would
     * start every open-loop connection that much after its time; 1 ns keeps the schedule. */
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);

    struct worker *workers = calloc(cfg.threads, sizeof(*workers));
    if (!workers)
        die("%s", "out of memory");
    for (unsigned i = 0; i < cfg.threads; i++) {
        struct worker *w = &workers[i];
        w->cfg = &cfg;
        w->index = i;
        w->cap = cfg.concurrency / cfg.threads + (i < cfg.concurrency % cfg.threads);
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        w->conns = calloc(w->cap, sizeof(struct conn));
        if (w->epfd < 0 || !w->conns)
            die("%s", "cannot create an epoll set or the connection slots");
        for (unsigned j = 0; j < w->cap; j++) {
            w->conns[j].fd = -1;
            w->conns[j].free_next = w->free_list;
            w->free_list = &w->conns[j];
        }
    }
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    t0_abs = now_abs() + 5000000ull;   /* 5 ms for the threads to start and wait for t0 */
    for (unsigned i = 0; i < cfg.threads; i++)
        if (pthread_create(&workers[i].thread, NULL, run_worker, &workers[i]) != 0)
            die("%s", "cannot start a thread");
    for (unsigned i = 0; i < cfg.threads; i++)
        pthread_join(workers[i].thread, NULL);
    uint64_t wall_ns = now_rel();
    getrusage(RUSAGE_SELF, &ru1);

    /* Merge every thread's samples and counters. */
    size_t n = 0;
    uint64_t capped = 0, started = 0, stop_ns = 0;
    int failed = 0;
    for (unsigned i = 0; i < cfg.threads; i++) {
        n += workers[i].samples.n;
        capped += workers[i].capped;
        started += workers[i].started;
        failed |= workers[i].failed;
        if (workers[i].stop_ns > stop_ns)
            stop_ns = workers[i].stop_ns;
    }
    /* Scheduled: open loop, every connection due before the end (and within --max-connections),
     * started or not; closed loop, every one started. */
    uint64_t scheduled = started;
    if (cfg.rate > 0) {
        const uint64_t duration_ns = (uint64_t)(cfg.duration_s * 1e9);
        scheduled = 0;
        while (schedule_ns(&cfg, scheduled) < duration_ns &&
               (!cfg.max_connections || scheduled < cfg.max_connections))
            scheduled++;
    }
    struct sample *all = malloc((n ? n : 1) * sizeof(*all));
    uint64_t *conn_v = malloc((n ? n : 1) * sizeof(uint64_t));
    uint64_t *req_v = malloc((n ? n : 1) * sizeof(uint64_t));
    uint64_t *sched_v = malloc((n ? n : 1) * sizeof(uint64_t));
    if (!all || !conn_v || !req_v || !sched_v)
        die("%s", "out of memory");
    size_t m = 0;
    for (unsigned i = 0; i < cfg.threads; i++) {
        memcpy(all + m, workers[i].samples.v, workers[i].samples.n * sizeof(*all));
        m += workers[i].samples.n;
    }
    qsort(all, n, sizeof(*all), cmp_sample);

    uint64_t counts[N_OUTCOMES] = {0}, last_ok = 0;
    static uint64_t other_errno[4096];     /* the errnos behind "other" */
    size_t nc = 0, nr = 0, ns = 0;
    for (size_t i = 0; i < n; i++) {
        const struct sample *s = &all[i];
        counts[s->outcome]++;
        if (s->outcome == OTHER && s->err < 4096)
            other_errno[s->err]++;
        if (s->connect_ns)
            conn_v[nc++] = s->connect_ns - s->start_ns;
        if (s->outcome == OK) {
            if (cfg.mode == MODE_HTTP)
                req_v[nr++] = s->done_ns - s->start_ns;
            sched_v[ns++] = s->done_ns - s->sched_ns;
            if (s->done_ns > last_ok)
                last_ok = s->done_ns;
        }
    }
    /* The run's length: until the last successful connection ended; failures at the end (a
     * timeout) do not stretch it. With none, until starting stopped. */
    double elapsed_s = (double)(last_ok ? last_ok : stop_ns) / 1e9;
    double achieved = elapsed_s > 0 ? (double)counts[OK] / elapsed_s : 0;
    struct stats sc = summarize(conn_v, nc), sr = summarize(req_v, nr), ss = summarize(sched_v, ns);
    double cpu_user = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                      (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6;
    double cpu_sys = (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                     (double)(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;

    if (cfg.samples_path && write_samples(cfg.samples_path, cfg.mode, all, n) != 0) {
        fprintf(stderr, "connload: cannot write %s: %s\n", cfg.samples_path, strerror(errno));
        failed = 1;
    }
    if (cfg.json) {
        printf("{\"connections_ok\":%llu,\"errors\":{", (unsigned long long)counts[OK]);
        for (int o = 1; o < N_OUTCOMES; o++)
            printf("\"%s\":%llu%s", OUTCOME_NAMES[o], (unsigned long long)counts[o],
                   o + 1 < N_OUTCOMES ? "," : "");
        printf("},\"other_errno\":{");
        int first = 1;
        for (int e = 0; e < 4096; e++) {
            if (other_errno[e]) {
                const char *name = e ? strerrorname_np(e) : "none";
                printf("%s\"%s\":%llu", first ? "" : ",", name ? name : "unknown",
                       (unsigned long long)other_errno[e]);
                first = 0;
            }
        }
        printf("},\"mode\":\"%s\",\"targets\":[", cfg.mode == MODE_HTTP ? "http" : "connect");
        for (unsigned i = 0; i < cfg.n_targets; i++)
            printf("\"%s\"%s", cfg.targets[i].text, i + 1 < cfg.n_targets ? "," : "");
        printf("],\"threads\":%u,\"concurrency\":%u,\"timeout_ms\":%.0f,", cfg.threads,
               cfg.concurrency, (double)cfg.timeout_ns / 1e6);
        if (cfg.rate > 0)
            printf("\"offered_rate\":%.3f,", cfg.rate);
        else
            printf("\"offered_rate\":null,");
        printf("\"achieved_rate\":%.3f,\"elapsed_s\":%.6f,\"wall_s\":%.6f,\"scheduled\":%llu,"
               "\"started\":%llu,\"unstarted\":%llu,\"capped\":%llu,\"cpu_user_s\":%.3f,"
               "\"cpu_sys_s\":%.3f,",
               achieved, elapsed_s, (double)wall_ns / 1e9, (unsigned long long)scheduled,
               (unsigned long long)started, (unsigned long long)(scheduled - started),
               (unsigned long long)capped, cpu_user, cpu_sys);
        print_stats_json("connect_us", &sc, 0);
        print_stats_json("request_us", &sr, 0);
        print_stats_json("schedule_latency_us", &ss, 1);
        printf("}\n");
    } else {
        printf("connections ok %llu, achieved %.1f/s", (unsigned long long)counts[OK], achieved);
        if (cfg.rate > 0)
            printf(" (offered %.1f/s, capped %llu)", cfg.rate, (unsigned long long)capped);
        printf(" in %.3f s; cpu user %.3f s sys %.3f s\n", elapsed_s, cpu_user, cpu_sys);
        printf("errors");
        for (int o = 1; o < N_OUTCOMES; o++)
            printf(" %s %llu", OUTCOME_NAMES[o], (unsigned long long)counts[o]);
        printf("\n");
        print_stats_text("connect us", &sc);
        print_stats_text("request us", &sr);
        print_stats_text("from schedule us", &ss);
    }
    return failed ? 1 : 0;
}

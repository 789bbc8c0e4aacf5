/* rf_pool: one helper thread for the two halves of a served token (kernels/cy_rnn.pyx
 * run_small, one step), instead of an OpenMP parallel region per call: a call spares the
 * cost of entering and leaving a GOMP region, small halves are both done by the caller
 * before the helper sees the job, and after an idle pause nobody waits for a sleeping
 * thread to wake (commit 302e335; figures in docs/performance.md).
 *
 * rf_pool_run(fn, arg) runs fn(arg, 0) on the calling thread and fn(arg, 1) on the
 * helper, or on the caller when the helper has not taken it by the time the caller's
 * own half is done (a helper asleep after an idle pause is woken for the next call, and
 * this call never waits for it). It returns 0 without running anything when the pool is
 * in use by another caller or cannot start its thread: the caller then runs the halves
 * another way.
 * The helper spins RF_POOL_SPIN_NS after its last job (calls in a serving loop come
 * every few microseconds), then sleeps on a futex. It starts off the caller's core, and
 * moves off it (sched_setaffinity: its allowed cores but that one) whenever the caller
 * finds it there: the scheduler placed it next to its creator while other threads
 * (OpenBLAS's, spinning after start-up) held the other core, and two spinning threads
 * on one core made tokens several times slower in some runs (commit 302e335; figures in
 * docs/performance.md). Linux only (elsewhere rf_pool_run always returns 0). After
 * fork() the child starts with no helper (pthread_atfork).
 */
#ifndef RF_POOL_H
#define RF_POOL_H

typedef void (*rf_pool_fn)(void *arg, int tid);

#if defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#ifndef _GNU_SOURCE
#define _GNU_SOURCE     /* (too late if sched.h came first: define it before any include) */
#endif
#include <sched.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>

#define RF_POOL_SPIN_NS 50000L

typedef struct {
    unsigned seq;            /* jobs posted (the helper futex-waits on it) */
    char pad0[60];
    unsigned claim;          /* seq of the job whose second half someone took */
    char pad1[60];
    unsigned done;           /* seq of the last job whose second half the helper finished */
    char pad2[60];
    int sleeping;            /* the helper is (about to be) blocked on seq */
    int started;             /* the helper thread exists */
    int busy;                /* a caller holds the pool */
    int helper_cpu;          /* where the helper ran the last half it took */
    int avoid_cpu;           /* the caller's core, for the helper to move off (-1: none) */
    cpu_set_t allowed;       /* the creating thread's cores when the helper started */
    int have_allowed;
    rf_pool_fn fn;
    void *arg;
} rf_pool_t;

static rf_pool_t rf_pool __attribute__((aligned(64)));

static inline long rf_pool_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static inline void rf_pool_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* The second half of job s: whoever swaps claim from s - 1 to s runs it. */
static inline int rf_pool_take(unsigned s) {
    unsigned want = s - 1u;
    return __atomic_compare_exchange_n(&rf_pool.claim, &want, s, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Take the helper off core c: the cores its creator was allowed, but c. */
static void rf_pool_move_off(int c) {
    cpu_set_t set = rf_pool.allowed;
    if (c < 0 || c >= CPU_SETSIZE || !rf_pool.have_allowed) return;
    if (!CPU_ISSET(c, &set) || CPU_COUNT(&set) < 2) return;
    CPU_CLR(c, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static void *rf_pool_helper(void *unused) {
    (void)unused;
    unsigned seen = __atomic_load_n(&rf_pool.seq, __ATOMIC_ACQUIRE);
    rf_pool_move_off(__atomic_exchange_n(&rf_pool.avoid_cpu, -1, __ATOMIC_ACQ_REL));
    for (;;) {
        long t0 = rf_pool_now_ns();
        unsigned spins = 0;
        unsigned s;
        while ((s = __atomic_load_n(&rf_pool.seq, __ATOMIC_ACQUIRE)) == seen) {
            rf_pool_pause();
            if ((++spins & 63u) == 0 && rf_pool_now_ns() - t0 > RF_POOL_SPIN_NS) {
                __atomic_store_n(&rf_pool.sleeping, 1, __ATOMIC_SEQ_CST);
                if (__atomic_load_n(&rf_pool.seq, __ATOMIC_SEQ_CST) == seen)
                    syscall(SYS_futex, &rf_pool.seq, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
                __atomic_store_n(&rf_pool.sleeping, 0, __ATOMIC_SEQ_CST);
                t0 = rf_pool_now_ns();
            }
        }
        seen = s;
        if (__atomic_load_n(&rf_pool.avoid_cpu, __ATOMIC_RELAXED) >= 0)
            rf_pool_move_off(__atomic_exchange_n(&rf_pool.avoid_cpu, -1, __ATOMIC_ACQ_REL));
        if (rf_pool_take(s)) {
            rf_pool.helper_cpu = sched_getcpu();
            rf_pool_fn fn = rf_pool.fn;
            void *arg = rf_pool.arg;
            fn(arg, 1);
            __atomic_store_n(&rf_pool.done, s, __ATOMIC_RELEASE);
        }
    }
    return NULL;
}

static void rf_pool_atfork_child(void) {
    /* the child has only the forking thread: no helper, nobody in the pool */
    rf_pool.started = 0;
    rf_pool.busy = 0;
    rf_pool.sleeping = 0;
    rf_pool.claim = rf_pool.done = rf_pool.seq;
    rf_pool.avoid_cpu = -1;
}

static int rf_pool_start(void) {
    static int atfork_done = 0;
    if (!atfork_done) {
        if (pthread_atfork(NULL, NULL, rf_pool_atfork_child) != 0) return 0;
        atfork_done = 1;
    }
    pthread_attr_t at;
    pthread_t th;
    rf_pool.have_allowed = sched_getaffinity(0, sizeof rf_pool.allowed, &rf_pool.allowed) == 0;
    rf_pool.avoid_cpu = sched_getcpu();      /* the new thread starts off the caller's core */
    if (pthread_attr_init(&at) != 0) return 0;
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 1 << 20);
    int ok = pthread_create(&th, &at, rf_pool_helper, NULL) == 0;
    pthread_attr_destroy(&at);
    if (ok) rf_pool.started = 1;
    return ok;
}

static inline int rf_pool_run(rf_pool_fn fn, void *arg) {
    int free_ = 0;
    if (!__atomic_compare_exchange_n(&rf_pool.busy, &free_, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return 0;
    if (!rf_pool.started && !rf_pool_start()) {
        __atomic_store_n(&rf_pool.busy, 0, __ATOMIC_RELEASE);
        return 0;
    }
    rf_pool.fn = fn;
    rf_pool.arg = arg;
    unsigned s = rf_pool.seq + 1u;
    __atomic_store_n(&rf_pool.seq, s, __ATOMIC_SEQ_CST);       /* publishes fn and arg */
    if (__atomic_load_n(&rf_pool.sleeping, __ATOMIC_SEQ_CST))
        syscall(SYS_futex, &rf_pool.seq, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    fn(arg, 0);
    if (rf_pool_take(s)) {
        fn(arg, 1);          /* the helper was late: its half runs here */
    } else {
        unsigned spins = 0;
        while (__atomic_load_n(&rf_pool.done, __ATOMIC_ACQUIRE) != s)
            if (++spins < 512u) rf_pool_pause(); else sched_yield();
        if (rf_pool.helper_cpu == sched_getcpu())      /* two spinning threads on one core */
            __atomic_store_n(&rf_pool.avoid_cpu, rf_pool.helper_cpu, __ATOMIC_RELEASE);
    }
    __atomic_store_n(&rf_pool.busy, 0, __ATOMIC_RELEASE);
    return 1;
}

#else
static inline int rf_pool_run(rf_pool_fn fn, void *arg) { (void)fn; (void)arg; return 0; }
#endif

#endif /* RF_POOL_H */

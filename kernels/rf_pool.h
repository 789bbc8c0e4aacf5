/* A small persistent thread pool for the serving path (one-token calls of a layer).
 *
 * An OpenMP parallel region costs about 1.2 us to open and close on the project's two
 * cores (GOMP wakes its team and joins it at an implicit barrier); a call that serves one
 * token takes about 13 us in all, so that is a tenth of it. Here the workers wait
 * spinning on a generation counter (and, after about 100 us without work, sleep on a
 * condition variable); the caller publishes a task, runs its own share as thread 0 and
 * spins until the workers are done: a cache-line handoff each way.
 *
 * rf_pool_run() returns 0 without running anything when the pool cannot take the task
 * (another thread is submitting, too many threads asked for, no pthreads, a worker could
 * not be started): the caller then runs the task its usual way (an OpenMP region).
 * After fork() the child starts with an empty pool (its workers are not inherited).
 */
#ifndef RF_POOL_H
#define RF_POOL_H

#define RF_POOL_MAX 64

typedef void (*rf_task_fn)(int tid, int nthr, void *arg);

#if (defined(__unix__) || defined(__APPLE__)) && (defined(__GNUC__) || defined(__clang__))
#include <pthread.h>
#include <sched.h>

#define RF_POOL_SPINS 2048u     /* pauses before a worker sleeps (about 100 us) */

typedef struct {
    int gen __attribute__((aligned(64)));   /* task generation: bumped per task */
    int done __attribute__((aligned(64)));  /* workers finished with this generation */
    rf_task_fn fn;
    void *arg;
    int nthr;                                /* team of the task, caller included */
    int nstarted;                            /* workers running (tids 1 .. nstarted) */
    int sleepers;                            /* workers asleep or going to sleep */
    pthread_mutex_t submit;                  /* one submitter at a time */
    pthread_mutex_t mu;                      /* guards sleepers and the condition */
    pthread_cond_t cv;
    int atfork;
    int start_gen[RF_POOL_MAX];              /* generation when worker tid was started */
} rf_pool_t;

static rf_pool_t rf_pool = { 0, 0, 0, 0, 0, 0, 0, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
                             PTHREAD_COND_INITIALIZER, 0, {0} };

static inline void rf_pool_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *rf_pool_main(void *p) {
    int tid = (int)(size_t)p;
    int seen = rf_pool.start_gen[tid];      /* (not gen now: the first task may be out already) */
    for (;;) {
        unsigned spins = 0;
        int g;
        while ((g = __atomic_load_n(&rf_pool.gen, __ATOMIC_ACQUIRE)) == seen) {
            if (++spins < RF_POOL_SPINS) {
                rf_pool_pause();
                continue;
            }
            pthread_mutex_lock(&rf_pool.mu);
            __atomic_add_fetch(&rf_pool.sleepers, 1, __ATOMIC_SEQ_CST);
            while (__atomic_load_n(&rf_pool.gen, __ATOMIC_SEQ_CST) == seen)
                pthread_cond_wait(&rf_pool.cv, &rf_pool.mu);
            __atomic_sub_fetch(&rf_pool.sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&rf_pool.mu);
            spins = 0;
        }
        seen = g;
        if (tid < rf_pool.nthr)
            rf_pool.fn(tid, rf_pool.nthr, rf_pool.arg);
        __atomic_add_fetch(&rf_pool.done, 1, __ATOMIC_ACQ_REL);
    }
    return NULL;
}

static void rf_pool_atfork_child(void) {
    /* the workers are gone in the child: start afresh */
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    rf_pool.submit = m;
    rf_pool.mu = m;
    rf_pool.cv = c;
    rf_pool.nstarted = 0;
    rf_pool.sleepers = 0;
}

/* Run fn(tid, nthr, arg) for tid 0 .. nthr-1 (0 on the calling thread); 1 when done, 0
 * when the pool could not take it (nothing ran). */
static int rf_pool_run(rf_task_fn fn, void *arg, int nthr) {
    if (nthr < 2 || nthr > RF_POOL_MAX)
        return 0;
    if (pthread_mutex_trylock(&rf_pool.submit) != 0)
        return 0;
    if (!rf_pool.atfork) {
        if (pthread_atfork(NULL, NULL, rf_pool_atfork_child) != 0) {
            pthread_mutex_unlock(&rf_pool.submit);
            return 0;
        }
        rf_pool.atfork = 1;
    }
    while (rf_pool.nstarted < nthr - 1) {
        pthread_t th;
        pthread_attr_t at;
        int ok = pthread_attr_init(&at) == 0;
        rf_pool.start_gen[rf_pool.nstarted + 1] = rf_pool.gen;
        if (ok) {
            pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
            ok = pthread_create(&th, &at, rf_pool_main, (void *)(size_t)(rf_pool.nstarted + 1)) == 0;
            pthread_attr_destroy(&at);
        }
        if (!ok) {
            pthread_mutex_unlock(&rf_pool.submit);
            return 0;
        }
        rf_pool.nstarted++;
    }
    int nw = rf_pool.nstarted;            /* every started worker reports done */
    rf_pool.fn = fn;
    rf_pool.arg = arg;
    rf_pool.nthr = nthr;
    __atomic_store_n(&rf_pool.done, 0, __ATOMIC_RELAXED);
    /* sequentially consistent with the sleepers' count: a worker going to sleep either
     * sees the new generation or is counted here and woken */
    __atomic_add_fetch(&rf_pool.gen, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&rf_pool.sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&rf_pool.mu);
        pthread_cond_broadcast(&rf_pool.cv);
        pthread_mutex_unlock(&rf_pool.mu);
    }
    fn(0, nthr, arg);
    for (unsigned spins = 0; __atomic_load_n(&rf_pool.done, __ATOMIC_ACQUIRE) < nw; ++spins) {
        if (spins < 65536u)
            rf_pool_pause();
        else
            sched_yield();
    }
    pthread_mutex_unlock(&rf_pool.submit);
    return 1;
}

#else
static inline int rf_pool_run(rf_task_fn fn, void *arg, int nthr) {
    (void)fn; (void)arg; (void)nthr;
    return 0;
}
#endif

#endif /* RF_POOL_H */

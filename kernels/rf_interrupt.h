/* rf_interrupt.h: Ctrl-C (any Python signal handler that raises) during a long kernel call.
 *
 * The kernels run without the GIL, so Python's handlers cannot run until the call returns.
 * The caller's thread (OpenMP thread 0 of the call's team), when it is Python's main
 * thread (the only one that runs signal handlers), takes the GIL every RF_INTR_PERIOD
 * seconds between steps and runs the pending handlers (PyErr_CheckSignals). A handler
 * that raised stops the team (rf_sync_stop): every thread leaves its step loop at its next
 * step, and the kernel's Python entry point re-raises the handler's exception once the
 * parallel region has ended (rf_intr_raise). Nothing the caller owns is left half-written
 * that it could use: the call raises, and layers hold no state of a call.
 *
 * Only for the Cython modules (it needs Python.h); the C kernels and tools/spill_check
 * never include it.
 */
#ifndef RF_INTERRUPT_H
#define RF_INTERRUPT_H

#include <Python.h>
#include <time.h>
#include "rf_gates.h"

#define RF_INTR_PERIOD 0.05     /* seconds between two looks (the GIL taken for ~1 us) */

typedef struct {
    int on;                      /* the call runs on Python's main thread */
    double next;                 /* monotonic time of the next look */
    PyObject *type, *value, *tb; /* the handler's exception, until rf_intr_raise */
} rf_intr_t;

static inline double rf_intr_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* With the GIL, before the call's parallel region; `main_ident`: Python's main thread. */
static inline void rf_intr_init(rf_intr_t *q, unsigned long main_ident) {
    q->on = PyThread_get_thread_ident() == main_ident;
    q->next = rf_intr_now() + RF_INTR_PERIOD;
    q->type = q->value = q->tb = NULL;
}

/* Thread 0 of the team, without the GIL, between steps: 1 when the call must stop. */
static inline int rf_intr_poll(rf_intr_t *q, rf_sync_t *b, int team) {
    if (!q || !q->on) return 0;
    if (q->type) return 1;
    double now = rf_intr_now();
    if (now < q->next) return 0;
    q->next = now + RF_INTR_PERIOD;
    if (!rf_sync_stoppable(b, team)) return 0;
    PyGILState_STATE g = PyGILState_Ensure();
    if (PyErr_CheckSignals() != 0) PyErr_Fetch(&q->type, &q->value, &q->tb);
    PyGILState_Release(g);
    if (q->type) rf_sync_stop(b);
    return q->type != NULL;
}

/* With the GIL, after the parallel region: -1 with the handler's exception set, else 0. */
static inline int rf_intr_raise(rf_intr_t *q) {
    if (!q->type) return 0;
    PyErr_Restore(q->type, q->value, q->tb);
    q->type = q->value = q->tb = NULL;
    return -1;
}

#endif

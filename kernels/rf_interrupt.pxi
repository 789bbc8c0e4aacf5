# Ctrl-C during a long kernel call (rf_interrupt.h), for cy_rnn and cy_train: included
# after their declaration of rf_sync_t.
import os as _os
import threading as _threading

cdef extern from "rf_interrupt.h":
    ctypedef struct rf_intr_t:
        int on
    void rf_intr_init(rf_intr_t *q, unsigned long main_ident)
    int rf_intr_poll(rf_intr_t *q, rf_sync_t *b, int team) noexcept nogil
    int rf_intr_raise(rf_intr_t *q) except -1
    int rf_sync_stopped(const rf_sync_t *b) noexcept nogil

# Python's main thread, the only one that runs signal handlers (a fork from another
# thread makes that thread the child's main thread)
cdef unsigned long _main_ident = _threading.main_thread().ident


def _refresh_main_ident():
    global _main_ident
    _main_ident = _threading.main_thread().ident


_os.register_at_fork(after_in_child=_refresh_main_ident)

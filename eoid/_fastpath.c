/* eoid._fastpath: one device's common interrupt round trip, in C.
 *
 * A FastPath is registered as the event loop's reader callback for a device's trigger
 * and EOI eventfds. While the Python side has handed it the channel's state (``take``),
 * it runs the two transitions that make up nearly every interrupt without entering
 * Python: ARMED --trigger--> PENDING (forward to the consumer) and PENDING --EOI-->
 * ARMED (spend a storm token, unmask). It counts what it does in its own C arrays; readers
 * add them to the channel's counts (``counts``: never reset, so the scrape thread may read
 * them while the loop runs, and nothing is written by two threads).
 *
 * Everything else -- a trigger while not ARMED, a spurious EOI, a throttled EOI, no loop
 * timer covering the EOI deadline, an unmask with no raw operation -- goes to the
 * ``slow`` callback unchanged: ``slow(TRIGGER, count)``, ``slow(EOI, count)`` or
 * ``slow(UNMASK, since)`` (the fast path made the transition; Python unmasks).
 * The state machine's rules live in eoid/channel.py; this file only repeats the two
 * common transitions, and tests/unit/test_fastpath.py checks them against it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

/* Mirrors eoid.channel.State */
enum { ST_ARMED = 1, ST_PENDING = 2 };
/* What ``slow`` is told */
enum { SLOW_TRIGGER = 1, SLOW_EOI = 2, SLOW_UNMASK = 3 };
/* Counters, in the order ``counts`` returns them */
enum { C_INTERRUPTS, C_COALESCED, C_EOIS, C_FORWARDS, C_UNMASKS, C_FORWARD_ERRORS, N_COUNTERS };
/* Histograms, likewise */
enum { H_SERVICE, H_DISPATCH, H_UNMASK, N_HISTOGRAMS };

#define MAX_BUCKETS 24 /* eoid.stats has 22 bounds: room to grow, not to waste per device */
#define MAX_UNMASK_ARG 64
#define NO_TIME INT64_MAX

static int64_t bucket_bounds[MAX_BUCKETS];
static Py_ssize_t n_bounds = -1; /* set once by set_buckets() */

typedef struct {
    PyObject_HEAD
    int trigger_fd, irq_fd, eoi_fd;
    PyObject *slow;
    /* the unmask: ioctl(fd, request, arg) if request, else an eventfd write to fd;
     * fd < 0: none, ask Python */
    int unmask_fd;
    unsigned long unmask_request;
    char unmask_arg[MAX_UNMASK_ARG];
    /* ownership: while ``fast``, the fields below are the channel's truth */
    int fast;
    int state;
    int64_t pending_since, timer_at, tat, backoff;
    /* the policy and the loop timer, as the channel and the runner had them at take() */
    int64_t eoi_timeout, interval, limit, half, backoff_initial, loop_timer_at;
    /* counted so far (never reset); dirty: anything at all */
    int dirty;
    uint64_t counters[N_COUNTERS];
    uint64_t buckets[N_HISTOGRAMS][MAX_BUCKETS + 1];
    uint64_t sums[N_HISTOGRAMS];
} FastPath;

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic_ns()'s clock */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void observe(FastPath *self, int h, int64_t ns)
{
    Py_ssize_t i = 0; /* bisect_left: latencies are short, a forward scan ends early */
    while (i < n_bounds && bucket_bounds[i] < ns)
        i++;
    self->buckets[h][i]++;
    self->sums[h] += (uint64_t)ns;
}

/* Read and reset an eventfd: its count, 0 if empty, -1 with an exception set. */
static int64_t drain(int fd)
{
    uint64_t value;
    if (read(fd, &value, sizeof value) == sizeof value)
        return (int64_t)value;
    if (errno == EAGAIN)
        return 0;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

static inline int signal_eventfd(int fd)
{
    static const uint64_t one = 1;
    return write(fd, &one, sizeof one) == sizeof one ? 0 : -1;
}

static PyObject *call_slow(FastPath *self, int kind, int64_t value)
{
    return PyObject_CallFunction(self->slow, "iL", kind, (long long)value);
}

static PyObject *on_trigger(FastPath *self, PyObject *Py_UNUSED(ignored))
{
    int64_t count = drain(self->trigger_fd);
    if (count <= 0)
        return count < 0 ? NULL : Py_NewRef(Py_None); /* 0: a spurious wake-up */
    int64_t now = now_ns();
    if (!self->fast || self->state != ST_ARMED || self->loop_timer_at > now + self->eoi_timeout)
        return call_slow(self, SLOW_TRIGGER, count);
    self->dirty = 1;
    self->counters[C_INTERRUPTS] += (uint64_t)count;
    self->counters[C_COALESCED] += (uint64_t)(count - 1);
    self->state = ST_PENDING;
    self->pending_since = now;
    self->timer_at = now + self->eoi_timeout;
    if (signal_eventfd(self->irq_fd) == 0) {
        self->counters[C_FORWARDS]++;
        observe(self, H_DISPATCH, now_ns() - now);
    } else {
        self->counters[C_FORWARD_ERRORS]++;
    }
    Py_RETURN_NONE;
}

static PyObject *on_eoi(FastPath *self, PyObject *Py_UNUSED(ignored))
{
    int64_t count = drain(self->eoi_fd);
    if (count <= 0)
        return count < 0 ? NULL : Py_NewRef(Py_None);
    int64_t now = now_ns();
    if (!self->fast || self->state != ST_PENDING)
        return call_slow(self, SLOW_EOI, count);
    /* Channel._take_token: GCRA. Decided before anything changes, so that a throttled
     * EOI reaches the channel exactly as if the fast path did not exist. */
    int64_t tat = self->tat;
    int refilled = tat - now <= self->half;
    if (refilled && tat < now)
        tat = now;
    tat += self->interval;
    if (tat - now > self->limit)
        return call_slow(self, SLOW_EOI, count);
    if (refilled)
        self->backoff = self->backoff_initial;
    self->tat = tat;
    self->dirty = 1;
    self->counters[C_EOIS] += (uint64_t)count;
    observe(self, H_SERVICE, now - self->pending_since);
    self->state = ST_ARMED;
    self->timer_at = NO_TIME;
    if (self->unmask_fd < 0)
        return call_slow(self, SLOW_UNMASK, now);
    int failed = self->unmask_request
        ? ioctl(self->unmask_fd, self->unmask_request, self->unmask_arg) < 0
        : signal_eventfd(self->unmask_fd) < 0;
    if (failed) /* Python retries through the device, which explains and counts the error */
        return call_slow(self, SLOW_UNMASK, now);
    self->counters[C_UNMASKS]++;
    observe(self, H_UNMASK, now_ns() - now);
    Py_RETURN_NONE;
}

static PyObject *take(FastPath *self, PyObject *args)
{
    long long state, pending_since, timer_at, tat, backoff;
    long long eoi_timeout, interval, limit, half, backoff_initial, loop_timer_at;
    if (!PyArg_ParseTuple(args, "LLLLLLLLLLL:take", &state, &pending_since, &timer_at, &tat,
                          &backoff, &eoi_timeout, &interval, &limit, &half, &backoff_initial,
                          &loop_timer_at))
        return NULL;
    if (state != ST_ARMED && state != ST_PENDING) {
        PyErr_Format(PyExc_ValueError, "the fast path runs ARMED and PENDING only, not %lld",
                     state);
        return NULL;
    }
    self->state = (int)state;
    self->pending_since = pending_since;
    self->timer_at = timer_at;
    self->tat = tat;
    self->backoff = backoff;
    self->eoi_timeout = eoi_timeout;
    self->interval = interval;
    self->limit = limit;
    self->half = half;
    self->backoff_initial = backoff_initial;
    self->loop_timer_at = loop_timer_at;
    self->fast = 1;
    Py_RETURN_NONE;
}

static PyObject *release(FastPath *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->fast)
        Py_RETURN_NONE;
    self->fast = 0;
    return Py_BuildValue("(iLLLL)", self->state, (long long)self->pending_since,
                         (long long)self->timer_at, (long long)self->tat,
                         (long long)self->backoff);
}

static PyObject *set_unmask(FastPath *self, PyObject *args)
{
    int fd;
    unsigned long request = 0;
    const char *arg = NULL;
    Py_ssize_t arglen = 0;
    if (!PyArg_ParseTuple(args, "i|ky#:set_unmask", &fd, &request, &arg, &arglen))
        return NULL;
    if (arglen > MAX_UNMASK_ARG) {
        PyErr_SetString(PyExc_ValueError, "unmask argument too long");
        return NULL;
    }
    memset(self->unmask_arg, 0, sizeof self->unmask_arg);
    if (arglen)
        memcpy(self->unmask_arg, arg, (size_t)arglen);
    self->unmask_fd = fd;
    self->unmask_request = request;
    Py_RETURN_NONE;
}

static PyObject *histogram_tuple(FastPath *self, int h)
{
    PyObject *t = PyTuple_New(n_bounds + 1);
    if (t == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i <= n_bounds; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(self->buckets[h][i]);
        if (v == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

static PyObject *counts(FastPath *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->dirty)
        Py_RETURN_NONE;
    PyObject *out = PyTuple_New(N_COUNTERS + 2 * N_HISTOGRAMS);
    if (out == NULL)
        return NULL;
    Py_ssize_t k = 0;
    for (int c = 0; c < N_COUNTERS; c++)
        PyTuple_SET_ITEM(out, k++, PyLong_FromUnsignedLongLong(self->counters[c]));
    for (int h = 0; h < N_HISTOGRAMS; h++) {
        PyTuple_SET_ITEM(out, k++, histogram_tuple(self, h));
        PyTuple_SET_ITEM(out, k++, PyLong_FromUnsignedLongLong(self->sums[h]));
    }
    for (k = 0; k < N_COUNTERS + 2 * N_HISTOGRAMS; k++) {
        if (PyTuple_GET_ITEM(out, k) == NULL) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

static int fastpath_init(FastPath *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"trigger_fd", "irq_fd", "eoi_fd", "slow", NULL};
    PyObject *slow;
    if (n_bounds < 0) {
        PyErr_SetString(PyExc_RuntimeError, "set_buckets() was not called");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiiO:FastPath", kwlist, &self->trigger_fd,
                                     &self->irq_fd, &self->eoi_fd, &slow))
        return -1;
    if (!PyCallable_Check(slow)) {
        PyErr_SetString(PyExc_TypeError, "slow must be callable");
        return -1;
    }
    Py_XSETREF(self->slow, Py_NewRef(slow));
    self->unmask_fd = -1;
    self->fast = 0;
    self->loop_timer_at = NO_TIME;
    return 0;
}

static int fastpath_traverse(FastPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->slow);
    return 0;
}

static int fastpath_clear(FastPath *self)
{
    Py_CLEAR(self->slow);
    return 0;
}

static void fastpath_dealloc(FastPath *self)
{
    PyObject_GC_UnTrack(self);
    fastpath_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *get_fast(FastPath *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->fast);
}

static PyMethodDef fastpath_methods[] = {
    {"on_trigger", (PyCFunction)on_trigger, METH_NOARGS,
     "Reader callback of the trigger eventfd."},
    {"on_eoi", (PyCFunction)on_eoi, METH_NOARGS, "Reader callback of the EOI eventfd."},
    {"take", (PyCFunction)take, METH_VARARGS,
     "take(state, pending_since, timer_at, tat, backoff, eoi_timeout, interval, limit, half,"
     " backoff_initial, loop_timer_at): run the common transitions on this state."},
    {"release", (PyCFunction)release, METH_NOARGS,
     "Stop; return (state, pending_since, timer_at, tat, backoff), or None if not running."},
    {"set_unmask", (PyCFunction)set_unmask, METH_VARARGS,
     "set_unmask(fd, request=0, arg=b''): ioctl(fd, request, arg), or an eventfd write when"
     " request is 0; fd -1: let Python unmask."},
    {"counts", (PyCFunction)counts, METH_NOARGS,
     "Everything counted so far, or None if nothing was."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef fastpath_members[] = {
    {"state", T_INT, offsetof(FastPath, state), READONLY, "the state while fast"},
    {"interrupts", T_ULONGLONG, offsetof(FastPath, counters) + C_INTERRUPTS * sizeof(uint64_t),
     READONLY, "interrupts counted here so far"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef fastpath_getset[] = {
    {"fast", (getter)get_fast, NULL, "whether the fast path holds the state", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "eoid._fastpath.FastPath",
    .tp_doc = PyDoc_STR("One device's common interrupt round trip; see the module docstring."),
    .tp_basicsize = sizeof(FastPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)fastpath_init,
    .tp_dealloc = (destructor)fastpath_dealloc,
    .tp_traverse = (traverseproc)fastpath_traverse,
    .tp_clear = (inquiry)fastpath_clear,
    .tp_methods = fastpath_methods,
    .tp_members = fastpath_members,
    .tp_getset = fastpath_getset,
};

static PyObject *set_buckets(PyObject *Py_UNUSED(module), PyObject *bounds)
{
    PyObject *seq = PySequence_Fast(bounds, "set_buckets() takes a sequence of ints");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_BUCKETS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many buckets");
        return NULL;
    }
    if (n_bounds >= 0 && n != n_bounds) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "the number of buckets cannot change");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        bucket_bounds[i] = v;
    }
    n_bounds = n;
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"set_buckets", set_buckets, METH_O,
     "set_buckets(bounds_ns): the histograms' upper bounds (eoid.stats.BUCKETS_NS)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "eoid._fastpath",
    .m_doc = PyDoc_STR("One device's common interrupt round trip, in C (eoid/_fastpath.c)."),
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&FastPathType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "FastPath", (PyObject *)&FastPathType) < 0 ||
        PyModule_AddIntConstant(m, "TRIGGER", SLOW_TRIGGER) < 0 ||
        PyModule_AddIntConstant(m, "EOI", SLOW_EOI) < 0 ||
        PyModule_AddIntConstant(m, "UNMASK", SLOW_UNMASK) < 0 ||
        PyModule_AddIntConstant(m, "NO_TIME", NO_TIME) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/* eoid._fastpath: the common interrupt round trip, in C, on a thread that never takes the GIL.
 *
 * A Lane is an epoll loop on a thread of its own. A FastPath is one device's share of it.
 * While the runner has lent a FastPath the channel's state (``take``), the device's trigger
 * and EOI eventfds are in the lane's epoll set, not the event loop's, and the lane runs the
 * two transitions that make up nearly every interrupt without any Python: ARMED
 * --trigger--> PENDING (forward to the consumer) and PENDING --EOI--> ARMED (spend a storm
 * token, unmask); it also counts a spurious EOI (one while ARMED). It counts what it does
 * in the FastPath's own arrays.
 *
 * Anything else -- a trigger while not ARMED, a spurious EOI, a throttled EOI, no loop timer
 * covering the EOI deadline -- the lane does not act on: it puts the count back into the
 * eventfd it read it from (an eventfd write adds to the counter), takes the fds out of its
 * epoll set and hands the device back (``notify_fd`` becomes readable; ``dispatch`` calls
 * the FastPath's ``returned`` callback on the event loop). The runner then takes the state
 * back (``release``), watches the fds on the event loop again and lets the channel handle
 * what they hold. An EOI it acted on whose unmask it could not issue (no raw operation, or
 * the syscall failed) is handed back the same way, with the unmask owed (``release``).
 *
 * So at any time exactly one side reads a device's eventfds and owns its state, and the
 * hand-over happens under the lane's one mutex. Nothing in Python (a metrics scrape,
 * logging, garbage collection) can delay an interrupt on the fast path. The rules live in
 * eoid/channel.py; this file repeats the two common transitions, and
 * tests/unit/test_fastpath.py checks them against it. ``Lane(threaded=False)`` runs no
 * thread: ``poll`` does one round on the caller's thread (tests).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

/* Mirrors eoid.channel.State */
enum { ST_ARMED = 1, ST_PENDING = 2 };
/* Counters, in the order ``counts`` returns them */
enum {
    C_INTERRUPTS, C_COALESCED, C_EOIS, C_FORWARDS, C_UNMASKS, C_FORWARD_ERRORS, C_SPURIOUS,
    N_COUNTERS
};
/* Histograms, likewise */
enum { H_SERVICE, H_DISPATCH, H_UNMASK, N_HISTOGRAMS };
/* What the lane made of an event */
enum { HANDLED, DECLINED, OWES_UNMASK };

#define MAX_BUCKETS 24 /* eoid.stats has 22 bounds: room to grow, not to waste per device */
#define MAX_UNMASK_ARG 64
#define NO_TIME INT64_MAX
#define BATCH 64
#define CONTROL_KEY UINT64_MAX /* the epoll key of control_fd: pings add 1, a stop 1 << 32 */

static int64_t bucket_bounds[MAX_BUCKETS];
static Py_ssize_t n_bounds = -1; /* set once by set_buckets() */

typedef struct Lane Lane;

typedef struct {
    PyObject_HEAD
    int trigger_fd, irq_fd, eoi_fd;
    PyObject *returned; /* called on the event loop when the lane hands the device back */
    Lane *lane;         /* set by Lane.add; the lane holds a reference to this object */
    uint32_t slot;
    /* the unmask: ioctl(fd, request, arg) if request, else an eventfd write to fd;
     * fd < 0: none, the runner unmasks */
    int unmask_fd;
    unsigned long unmask_request;
    char unmask_arg[MAX_UNMASK_ARG];
    /* ownership, under the lane's mutex: ``lent`` the state is here (take .. release);
     * ``fast`` the fds are in the lane's epoll set and the lane may act */
    int lent, fast, handed_back;
    int64_t owed_unmask; /* when the EOI was read, if the runner owes its unmask; else 0 */
    int state;
    int64_t pending_since, timer_at, tat, backoff;
    int64_t eoi_timeout, interval, limit, half, backoff_initial, loop_timer_at;
    int unmask_on_spurious;
    /* counted so far (never reset); dirty: anything at all */
    int dirty;
    uint64_t counters[N_COUNTERS];
    uint64_t buckets[N_HISTOGRAMS][MAX_BUCKETS + 1];
    uint64_t sums[N_HISTOGRAMS];
} FastPath;

struct Lane {
    PyObject_HEAD
    int epfd, control_fd, notify_fd;
    int threaded, started, closed;
    pthread_t thread;
    pthread_mutex_t mu;
    FastPath **slots; /* owned references */
    uint32_t *generations; /* bumped when a slot is freed: stale epoll events are skipped */
    uint32_t *handed_back; /* slots waiting for dispatch() */
    Py_ssize_t n_slots, n_handed_back;
    uint64_t pongs; /* pings answered by the lane's thread (the watchdog's liveness check) */
};

/* --- the lane's side: no Python from here to lane_round ---------------------------------- */

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic_ns()'s clock */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void observe(FastPath *f, int h, int64_t ns)
{
    Py_ssize_t i = 0; /* bisect_left: latencies are short, a forward scan ends early */
    while (i < n_bounds && bucket_bounds[i] < ns)
        i++;
    f->buckets[h][i]++;
    f->sums[h] += (uint64_t)ns;
}

static inline int add_to_eventfd(int fd, uint64_t value)
{
    return write(fd, &value, sizeof value) == sizeof value ? 0 : -1;
}

static int fast_trigger(FastPath *f, int64_t count, int64_t now)
{
    if (f->state != ST_ARMED || f->loop_timer_at > now + f->eoi_timeout)
        return DECLINED;
    f->dirty = 1;
    f->counters[C_INTERRUPTS] += (uint64_t)count;
    f->counters[C_COALESCED] += (uint64_t)(count - 1);
    f->state = ST_PENDING;
    f->pending_since = now;
    f->timer_at = now + f->eoi_timeout;
    if (add_to_eventfd(f->irq_fd, 1) == 0) {
        f->counters[C_FORWARDS]++;
        observe(f, H_DISPATCH, now_ns() - now);
    } else {
        f->counters[C_FORWARD_ERRORS]++;
    }
    return HANDLED;
}

static int fast_eoi(FastPath *f, int64_t count, int64_t now)
{
    if (f->state == ST_ARMED && !f->unmask_on_spurious) { /* Channel.eoi: nothing pending */
        f->dirty = 1;
        f->counters[C_EOIS] += (uint64_t)count;
        f->counters[C_SPURIOUS] += (uint64_t)count;
        return HANDLED;
    }
    if (f->state != ST_PENDING)
        return DECLINED;
    /* Channel._take_token: GCRA. Decided before anything changes, so that a throttled
     * EOI reaches the channel exactly as if the fast path did not exist. */
    int64_t tat = f->tat;
    int refilled = tat - now <= f->half;
    if (refilled && tat < now)
        tat = now;
    tat += f->interval;
    if (tat - now > f->limit)
        return DECLINED;
    if (refilled)
        f->backoff = f->backoff_initial;
    f->tat = tat;
    f->dirty = 1;
    f->counters[C_EOIS] += (uint64_t)count;
    observe(f, H_SERVICE, now - f->pending_since);
    f->state = ST_ARMED;
    f->timer_at = NO_TIME;
    int failed = f->unmask_fd < 0 ? 1
        : f->unmask_request ? ioctl(f->unmask_fd, f->unmask_request, f->unmask_arg) < 0
        : add_to_eventfd(f->unmask_fd, 1) < 0;
    if (failed) { /* the runner unmasks through the device, which explains any error */
        f->owed_unmask = now;
        return OWES_UNMASK;
    }
    f->counters[C_UNMASKS]++;
    observe(f, H_UNMASK, now_ns() - now);
    return HANDLED;
}

static inline uint64_t event_key(Lane *lane, FastPath *f, int eoi)
{
    return (uint64_t)lane->generations[f->slot] << 32 | (uint64_t)f->slot << 1 | (uint64_t)eoi;
}

/* Put the fds in the epoll set (mu held). */
static int watch_fds(Lane *lane, FastPath *f)
{
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = event_key(lane, f, 0);
    if (epoll_ctl(lane->epfd, EPOLL_CTL_ADD, f->trigger_fd, &ev) < 0)
        return -1;
    ev.data.u64 = event_key(lane, f, 1);
    if (epoll_ctl(lane->epfd, EPOLL_CTL_ADD, f->eoi_fd, &ev) < 0) {
        int saved = errno;
        epoll_ctl(lane->epfd, EPOLL_CTL_DEL, f->trigger_fd, NULL);
        errno = saved;
        return -1;
    }
    f->fast = 1;
    return 0;
}

/* Take the fds out of the epoll set (mu held). */
static void unwatch_fds(Lane *lane, FastPath *f)
{
    if (!f->fast)
        return;
    epoll_ctl(lane->epfd, EPOLL_CTL_DEL, f->trigger_fd, NULL);
    epoll_ctl(lane->epfd, EPOLL_CTL_DEL, f->eoi_fd, NULL);
    f->fast = 0;
}

static void hand_back(Lane *lane, FastPath *f)
{
    unwatch_fds(lane, f);
    if (!f->handed_back) {
        f->handed_back = 1;
        lane->handed_back[lane->n_handed_back++] = f->slot;
    }
}

/* One device event (mu held); returns whether the event loop must be told. */
static int lane_event(Lane *lane, uint64_t key)
{
    uint32_t slot = (uint32_t)(key & 0xFFFFFFFF) >> 1, eoi = key & 1;
    if (slot >= lane->n_slots || lane->generations[slot] != (uint32_t)(key >> 32))
        return 0;
    FastPath *f = lane->slots[slot];
    if (f == NULL || !f->fast)
        return 0; /* handed back or released since epoll_wait returned */
    int fd = eoi ? f->eoi_fd : f->trigger_fd;
    uint64_t count;
    if (read(fd, &count, sizeof count) != sizeof count) {
        if (errno == EAGAIN)
            return 0;
        hand_back(lane, f); /* the runner will meet the same error, and report it */
        return 1;
    }
    int64_t now = now_ns();
    int done = eoi ? fast_eoi(f, (int64_t)count, now) : fast_trigger(f, (int64_t)count, now);
    if (done == HANDLED)
        return 0;
    if (done == DECLINED)
        add_to_eventfd(fd, count); /* as if never read: the channel reads it */
    hand_back(lane, f);
    return 1;
}

/* One round: wait (timeout ms, -1 forever), act. Returns 1 when told to stop. */
static int lane_round(Lane *lane, int timeout)
{
    struct epoll_event events[BATCH];
    int n = epoll_wait(lane->epfd, events, BATCH, timeout);
    if (n <= 0)
        return 0;
    int stop = 0, notify = 0;
    pthread_mutex_lock(&lane->mu);
    for (int i = 0; i < n; i++) {
        uint64_t key = events[i].data.u64;
        if (key == CONTROL_KEY) {
            uint64_t value;
            if (read(lane->control_fd, &value, sizeof value) == sizeof value) {
                lane->pongs += value & 0xFFFFFFFF; /* pings */
                stop |= value >> 32 != 0;
            }
        } else {
            notify |= lane_event(lane, key);
        }
    }
    pthread_mutex_unlock(&lane->mu);
    if (notify)
        add_to_eventfd(lane->notify_fd, 1);
    return stop;
}

static void *lane_main(void *arg)
{
    Lane *lane = arg;
    while (!lane_round(lane, -1))
        ;
    return NULL;
}

/* --- FastPath: the runner's side (GIL held) ------------------------------------------------ */

static inline void lock(FastPath *f)
{
    if (f->lane)
        pthread_mutex_lock(&f->lane->mu);
}

static inline void unlock(FastPath *f)
{
    if (f->lane)
        pthread_mutex_unlock(&f->lane->mu);
}

static PyObject *fp_take(FastPath *self, PyObject *args)
{
    long long state, pending_since, timer_at, tat, backoff;
    long long eoi_timeout, interval, limit, half, backoff_initial, loop_timer_at;
    int unmask_on_spurious;
    if (!PyArg_ParseTuple(args, "LLLLLLLLLLpL:take", &state, &pending_since, &timer_at, &tat,
                          &backoff, &eoi_timeout, &interval, &limit, &half, &backoff_initial,
                          &unmask_on_spurious, &loop_timer_at))
        return NULL;
    if (state != ST_ARMED && state != ST_PENDING) {
        PyErr_Format(PyExc_ValueError, "the fast path runs ARMED and PENDING only, not %lld",
                     state);
        return NULL;
    }
    if (self->lane == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "not on a lane (Lane.add)");
        return NULL;
    }
    lock(self);
    if (self->lent) {
        unlock(self);
        PyErr_SetString(PyExc_RuntimeError, "already lent: release() first");
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
    self->unmask_on_spurious = unmask_on_spurious;
    self->loop_timer_at = loop_timer_at;
    self->owed_unmask = 0;
    int failed = watch_fds(self->lane, self);
    self->lent = !failed;
    unlock(self);
    if (failed)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *fp_release(FastPath *self, PyObject *Py_UNUSED(ignored))
{
    lock(self);
    if (!self->lent) {
        unlock(self);
        Py_RETURN_NONE;
    }
    if (self->lane)
        unwatch_fds(self->lane, self);
    self->lent = 0;
    int state = self->state;
    long long pending_since = self->pending_since, timer_at = self->timer_at, tat = self->tat,
              backoff = self->backoff, owed = self->owed_unmask;
    self->owed_unmask = 0;
    unlock(self);
    return Py_BuildValue("(iLLLLL)", state, pending_since, timer_at, tat, backoff, owed);
}

static PyObject *fp_set_unmask(FastPath *self, PyObject *args)
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
    lock(self);
    memset(self->unmask_arg, 0, sizeof self->unmask_arg);
    if (arglen)
        memcpy(self->unmask_arg, arg, (size_t)arglen);
    self->unmask_fd = fd;
    self->unmask_request = request;
    unlock(self);
    Py_RETURN_NONE;
}

static PyObject *histogram_tuple(const uint64_t *buckets)
{
    PyObject *t = PyTuple_New(n_bounds + 1);
    if (t == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i <= n_bounds; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(buckets[i]);
        if (v == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

static PyObject *fp_counts(FastPath *self, PyObject *Py_UNUSED(ignored))
{
    uint64_t counters[N_COUNTERS], buckets[N_HISTOGRAMS][MAX_BUCKETS + 1], sums[N_HISTOGRAMS];
    lock(self); /* a consistent copy; Python objects are made outside the lock */
    int dirty = self->dirty;
    memcpy(counters, self->counters, sizeof counters);
    memcpy(buckets, self->buckets, sizeof buckets);
    memcpy(sums, self->sums, sizeof sums);
    unlock(self);
    if (!dirty)
        Py_RETURN_NONE;
    PyObject *out = PyTuple_New(N_COUNTERS + 2 * N_HISTOGRAMS);
    if (out == NULL)
        return NULL;
    Py_ssize_t k = 0;
    for (int c = 0; c < N_COUNTERS; c++)
        PyTuple_SET_ITEM(out, k++, PyLong_FromUnsignedLongLong(counters[c]));
    for (int h = 0; h < N_HISTOGRAMS; h++) {
        PyTuple_SET_ITEM(out, k++, histogram_tuple(buckets[h]));
        PyTuple_SET_ITEM(out, k++, PyLong_FromUnsignedLongLong(sums[h]));
    }
    for (k = 0; k < N_COUNTERS + 2 * N_HISTOGRAMS; k++) {
        if (PyTuple_GET_ITEM(out, k) == NULL) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

static PyObject *fp_get_state(FastPath *self, void *Py_UNUSED(closure))
{
    lock(self);
    int state = self->state;
    unlock(self);
    return PyLong_FromLong(state);
}

static PyObject *fp_get_interrupts(FastPath *self, void *Py_UNUSED(closure))
{
    lock(self);
    uint64_t interrupts = self->counters[C_INTERRUPTS];
    unlock(self);
    return PyLong_FromUnsignedLongLong(interrupts);
}

static PyObject *fp_get_lent(FastPath *self, void *Py_UNUSED(closure))
{
    lock(self);
    int lent = self->lent;
    unlock(self);
    return PyBool_FromLong(lent);
}

static int fp_init(FastPath *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"trigger_fd", "irq_fd", "eoi_fd", "returned", NULL};
    PyObject *returned;
    if (n_bounds < 0) {
        PyErr_SetString(PyExc_RuntimeError, "set_buckets() was not called");
        return -1;
    }
    if (self->lane != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a FastPath on a lane cannot be re-initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiiO:FastPath", kwlist, &self->trigger_fd,
                                     &self->irq_fd, &self->eoi_fd, &returned))
        return -1;
    if (!PyCallable_Check(returned)) {
        PyErr_SetString(PyExc_TypeError, "returned must be callable");
        return -1;
    }
    Py_XSETREF(self->returned, Py_NewRef(returned));
    self->unmask_fd = -1;
    self->loop_timer_at = NO_TIME;
    return 0;
}

static int fp_traverse(FastPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->returned);
    return 0;
}

static int fp_clear(FastPath *self)
{
    Py_CLEAR(self->returned);
    return 0;
}

static void fp_dealloc(FastPath *self)
{
    PyObject_GC_UnTrack(self);
    fp_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef fp_methods[] = {
    {"take", (PyCFunction)fp_take, METH_VARARGS,
     "take(state, pending_since, timer_at, tat, backoff, eoi_timeout, interval, limit, half,"
     " backoff_initial, unmask_on_spurious, loop_timer_at): lend the state; the lane reads"
     " the eventfds now."},
    {"release", (PyCFunction)fp_release, METH_NOARGS,
     "Take the state back: (state, pending_since, timer_at, tat, backoff, owed_unmask), or"
     " None if it was not lent. owed_unmask: when the EOI of an unmask still owed was read."},
    {"set_unmask", (PyCFunction)fp_set_unmask, METH_VARARGS,
     "set_unmask(fd, request=0, arg=b''): ioctl(fd, request, arg), or an eventfd write when"
     " request is 0; fd -1: the runner unmasks."},
    {"counts", (PyCFunction)fp_counts, METH_NOARGS,
     "Everything counted so far, or None if nothing was."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef fp_getset[] = {
    {"state", (getter)fp_get_state, NULL, "the state while lent", NULL},
    {"interrupts", (getter)fp_get_interrupts, NULL, "interrupts counted here so far", NULL},
    {"lent", (getter)fp_get_lent, NULL, "whether the state is here", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "eoid._fastpath.FastPath",
    .tp_doc = PyDoc_STR("One device's share of a lane; see the module docstring."),
    .tp_basicsize = sizeof(FastPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)fp_init,
    .tp_dealloc = (destructor)fp_dealloc,
    .tp_traverse = (traverseproc)fp_traverse,
    .tp_clear = (inquiry)fp_clear,
    .tp_methods = fp_methods,
    .tp_getset = fp_getset,
};

/* --- Lane: the event loop's side (GIL held) ------------------------------------------------ */

static PyObject *lane_add(Lane *self, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &FastPathType)) {
        PyErr_SetString(PyExc_TypeError, "add() takes a FastPath");
        return NULL;
    }
    FastPath *f = (FastPath *)arg;
    if (f->lane != NULL) {
        PyErr_SetString(PyExc_ValueError, "already on a lane");
        return NULL;
    }
    if (self->closed) {
        PyErr_SetString(PyExc_ValueError, "the lane is closed");
        return NULL;
    }
    pthread_mutex_lock(&self->mu);
    Py_ssize_t slot = 0;
    while (slot < self->n_slots && self->slots[slot] != NULL)
        slot++;
    if (slot == self->n_slots) {
        Py_ssize_t n = self->n_slots ? 2 * self->n_slots : 64;
        FastPath **slots = PyMem_RawRealloc(self->slots, n * sizeof *slots);
        if (slots != NULL)
            self->slots = slots;
        uint32_t *gens = PyMem_RawRealloc(self->generations, n * sizeof *gens);
        if (gens != NULL)
            self->generations = gens;
        uint32_t *back = PyMem_RawRealloc(self->handed_back, n * sizeof *back);
        if (back != NULL)
            self->handed_back = back;
        if (slots == NULL || gens == NULL || back == NULL) {
            pthread_mutex_unlock(&self->mu);
            return PyErr_NoMemory();
        }
        for (Py_ssize_t i = self->n_slots; i < n; i++) {
            self->slots[i] = NULL;
            self->generations[i] = 0;
        }
        self->n_slots = n;
    }
    self->slots[slot] = (FastPath *)Py_NewRef(f);
    f->lane = self;
    f->slot = (uint32_t)slot;
    pthread_mutex_unlock(&self->mu);
    Py_RETURN_NONE;
}

static PyObject *lane_remove(Lane *self, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &FastPathType)) {
        PyErr_SetString(PyExc_TypeError, "remove() takes a FastPath");
        return NULL;
    }
    FastPath *f = (FastPath *)arg;
    if (f->lane == NULL)
        Py_RETURN_NONE; /* gone already (the lane was closed) */
    if (f->lane != self) {
        PyErr_SetString(PyExc_ValueError, "on another lane");
        return NULL;
    }
    pthread_mutex_lock(&self->mu);
    unwatch_fds(self, f);
    f->lent = 0;
    if (f->handed_back) { /* its slot may be reused before dispatch(): no stale entry */
        for (Py_ssize_t i = 0; i < self->n_handed_back; i++) {
            if (self->handed_back[i] == f->slot) {
                self->handed_back[i] = self->handed_back[--self->n_handed_back];
                break;
            }
        }
        f->handed_back = 0;
    }
    self->slots[f->slot] = NULL;
    self->generations[f->slot]++;
    f->lane = NULL;
    pthread_mutex_unlock(&self->mu);
    Py_DECREF(f);
    Py_RETURN_NONE;
}

static PyObject *lane_dispatch(Lane *self, PyObject *Py_UNUSED(ignored))
{
    uint64_t value;
    if (read(self->notify_fd, &value, sizeof value) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    for (;;) { /* one at a time: a callback may add, remove or hand back devices */
        pthread_mutex_lock(&self->mu);
        FastPath *f = NULL;
        while (self->n_handed_back > 0 && f == NULL) {
            uint32_t slot = self->handed_back[--self->n_handed_back];
            f = self->slots[slot];
            if (f != NULL && f->handed_back) {
                f->handed_back = 0;
                Py_INCREF(f);
            } else {
                f = NULL;
            }
        }
        pthread_mutex_unlock(&self->mu);
        if (f == NULL)
            Py_RETURN_NONE;
        PyObject *callback = f->returned ? Py_NewRef(f->returned) : NULL;
        Py_DECREF(f);
        if (callback != NULL) {
            PyObject *r = PyObject_CallNoArgs(callback);
            Py_DECREF(callback);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
        }
    }
}

static PyObject *lane_poll(Lane *self, PyObject *Py_UNUSED(ignored))
{
    if (self->threaded) {
        PyErr_SetString(PyExc_RuntimeError, "a threaded lane polls on its own thread");
        return NULL;
    }
    lane_round(self, 0);
    return lane_dispatch(self, NULL);
}

static PyObject *lane_ping(Lane *self, PyObject *Py_UNUSED(ignored))
{
    if (add_to_eventfd(self->control_fd, 1) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (!self->threaded)
        lane_round(self, 0);
    Py_RETURN_NONE;
}

static void lane_stop(Lane *self)
{
    if (self->started) {
        add_to_eventfd(self->control_fd, (uint64_t)1 << 32);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(self->thread, NULL);
        Py_END_ALLOW_THREADS
        self->started = 0;
    }
}

static PyObject *lane_close(Lane *self, PyObject *Py_UNUSED(ignored))
{
    if (self->closed)
        Py_RETURN_NONE;
    lane_stop(self);
    self->closed = 1;
    self->n_handed_back = 0;
    for (Py_ssize_t i = 0; i < self->n_slots; i++) {
        FastPath *f = self->slots[i];
        if (f != NULL) {
            f->lane = NULL;
            f->fast = f->lent = 0;
            self->slots[i] = NULL;
            Py_DECREF(f);
        }
    }
    close(self->epfd);
    close(self->control_fd);
    close(self->notify_fd);
    Py_RETURN_NONE;
}

static int lane_init(Lane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"threaded", NULL};
    int threaded = 1;
    if (self->epfd > 0) {
        PyErr_SetString(PyExc_RuntimeError, "a Lane cannot be re-initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:Lane", kwlist, &threaded))
        return -1;
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->control_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->epfd < 0 || self->control_fd < 0 || self->notify_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = CONTROL_KEY};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->control_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    pthread_mutex_init(&self->mu, NULL);
    self->threaded = threaded;
    if (threaded) {
        int err = pthread_create(&self->thread, NULL, lane_main, self);
        if (err != 0) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        self->started = 1;
    }
    return 0;
}

static int lane_traverse(Lane *self, visitproc visit, void *arg)
{
    for (Py_ssize_t i = 0; i < self->n_slots; i++)
        Py_VISIT(self->slots[i]);
    return 0;
}

static void lane_dealloc(Lane *self)
{
    PyObject_GC_UnTrack(self);
    if (self->epfd > 0)
        Py_XDECREF(lane_close(self, NULL));
    if (self->epfd > 0)
        pthread_mutex_destroy(&self->mu);
    PyMem_RawFree(self->slots);
    PyMem_RawFree(self->generations);
    PyMem_RawFree(self->handed_back);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *lane_get_notify_fd(Lane *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->notify_fd);
}

static PyObject *lane_get_pongs(Lane *self, void *Py_UNUSED(closure))
{
    pthread_mutex_lock(&self->mu);
    uint64_t pongs = self->pongs;
    pthread_mutex_unlock(&self->mu);
    return PyLong_FromUnsignedLongLong(pongs);
}

static PyMethodDef lane_methods[] = {
    {"add", (PyCFunction)lane_add, METH_O, "add(fast_path): a device joins the lane."},
    {"remove", (PyCFunction)lane_remove, METH_O,
     "remove(fast_path): the device leaves (its state, if lent, is dropped)."},
    {"dispatch", (PyCFunction)lane_dispatch, METH_NOARGS,
     "The event loop's reader of notify_fd: call ``returned`` of each device handed back."},
    {"poll", (PyCFunction)lane_poll, METH_NOARGS,
     "Without a thread: one round on this thread, then dispatch() (tests)."},
    {"ping", (PyCFunction)lane_ping, METH_NOARGS,
     "Ask the lane's thread for a sign of life: ``pongs`` goes up when it answers."},
    {"close", (PyCFunction)lane_close, METH_NOARGS,
     "Stop the thread and let every device go. Idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef lane_getset[] = {
    {"notify_fd", (getter)lane_get_notify_fd, NULL,
     "readable when devices were handed back: the event loop calls dispatch()", NULL},
    {"pongs", (getter)lane_get_pongs, NULL, "pings answered", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "eoid._fastpath.Lane",
    .tp_doc = PyDoc_STR("An epoll loop on its own thread running the devices lent to it."),
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lane_init,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_traverse = (traverseproc)lane_traverse,
    .tp_methods = lane_methods,
    .tp_getset = lane_getset,
};

/* --- the module -------------------------------------------------------------------------- */

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
    .m_doc = PyDoc_STR("The common interrupt round trip, in C (eoid/_fastpath.c)."),
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&FastPathType) < 0 || PyType_Ready(&LaneType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "FastPath", (PyObject *)&FastPathType) < 0 ||
        PyModule_AddObjectRef(m, "Lane", (PyObject *)&LaneType) < 0 ||
        PyModule_AddIntConstant(m, "NO_TIME", NO_TIME) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

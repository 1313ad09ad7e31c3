/* eoid._fastpath: the common interrupt round trip, in C, on a thread that never takes the GIL.
 *
 * A Lane is an epoll loop on a thread of its own. A FastPath is one device's share of it.
 * The runner sends it the policy once and on reload (``set_policy``), then lends it the
 * channel's state (``lend``) whenever the line is in a simple state, and takes it back
 * (``reclaim``, a named Released record) before doing anything else: one pair of verbs,
 * and one ownership value in C (OWN_LOOP, OWN_LANE, OWN_RETURNED). While the lane owns a
 * device, its trigger and EOI eventfds are in the lane's epoll set, not the event loop's,
 * and the lane runs the two transitions that make up nearly every interrupt without any
 * Python: ARMED --trigger--> PENDING (forward to the consumer) and PENDING --EOI--> ARMED
 * (spend a storm token, unmask); it also counts a spurious EOI (one while ARMED), and takes
 * the trigger of a line taken over with its state unknown (``adopting``: PENDING, but a
 * trigger means the line was armed, as from ARMED; its EOI is declined). It counts
 * what it does in the FastPath's own arrays (``counts``, a named Counts record).
 *
 * Anything else -- a trigger while neither ARMED nor adopting, an adopted line's EOI, a
 * spurious EOI the policy unmasks for, a throttled EOI, no loop timer covering the EOI
 * deadline, a value past the int64 range -- the lane does not act on: it keeps the count it
 * read for the runner (Released.carried), takes the fds out of its epoll set and hands the
 * device back (``notify_fd`` becomes readable; ``dispatch`` calls the FastPath's
 * ``returned`` callback on the event loop). The runner reclaims the state, hands the count
 * to the channel and watches the fds again. An EOI it acted on whose unmask it could not
 * issue, and a forward that failed, are handed back the same way (the runner unmasks, and
 * logs what failed: the lane cannot).
 *
 * So at any time exactly one side reads a device's eventfds and owns its state, and the
 * hand-over happens under the lane's one mutex, under which no syscall may block (reads
 * with RWF_NOWAIT, writes only with room: see nb_read and guarded_write, because
 * consumers share irq's and eoi's file flags). Nothing in Python (a metrics scrape,
 * logging, garbage collection) can delay an interrupt on the fast path. The rules live in
 * eoid/channel.py, which says which of them this file repeats; tests/unit/test_fastpath.py
 * checks them against it with an injected clock (``Lane(threaded=False)`` runs no thread:
 * ``poll(now)`` does one round on the caller's thread), and ./dev sanitize runs it under
 * ASan, UBSan and TSan, with faults injected (-DEOID_FAULT_INJECTION).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structseq.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* Mirrors eoid.channel.State (tests/unit/test_fastpath.py asserts it) */
enum { ST_ARMED = 1, ST_PENDING = 2 };
/* Who owns a device's state and reads its fds (one value, under the lane's mutex):
 * the event loop (nothing lent); the lane (lent, fds in its epoll set, it acts); or
 * nobody acting (lent, but handed back: the fds are out of the set, the state waits here
 * for ``reclaim``). */
enum { OWN_LOOP, OWN_LANE, OWN_RETURNED };
/* Counters, in the order of the Counts record */
enum {
    C_INTERRUPTS, C_COALESCED, C_EOIS, C_FORWARDS, C_UNMASKS, C_FORWARD_ERRORS, C_SPURIOUS,
    C_UNMASK_ERRORS, C_READ_ERRORS, C_EPOLL_ERRORS, N_COUNTERS
};
/* Histograms, likewise */
enum { H_SERVICE, H_DISPATCH, H_UNMASK, N_HISTOGRAMS };
/* What the lane made of an event */
enum { HANDLED, DECLINED, OWES_UNMASK, HANDLED_TELL };

#define MAX_BUCKETS 24 /* eoid.stats has 22 bounds: room to grow, not to waste per device */
#define MAX_UNMASK_ARG 64
#define NO_TIME INT64_MAX
#define BATCH 64
#define CONTROL_KEY UINT64_MAX /* the epoll key of control_fd: pings add 1, a stop 1 << 32 */
#define RESCUE_SIGNAL SIGURG   /* see guarded_write */
#define RESCUE_AFTER_NS 50000000LL
#define SENTINEL_PERIOD_NS 25000000L
#define SENTINEL_QUIET_PERIODS 40 /* a second without a guarded write: the sentinel sleeps */

/* --- injected faults (a test build: -DEOID_FAULT_INJECTION) ------------------------------ */

/* race: guarded_write's check says the write cannot wait when it can, as when a consumer
 * clears O_NONBLOCK (or fills the count) between that check and the write(): the write
 * then waits, and the sentinel must interrupt it. */
enum { F_EPOLL_CTL, F_READ, F_WRITE, F_IOCTL, F_RACE, N_FAULTS };
#ifdef EOID_FAULT_INJECTION
static const char *fault_names[N_FAULTS] = {"epoll_ctl", "read", "write", "ioctl", "race"};
static int fault_left[N_FAULTS], fault_errno[N_FAULTS]; /* atomics: set on a Python thread */
static inline int faulted(int op)
{
    int left = __atomic_load_n(&fault_left[op], __ATOMIC_RELAXED);
    while (left > 0) {
        if (__atomic_compare_exchange_n(&fault_left[op], &left, left - 1, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
            errno = __atomic_load_n(&fault_errno[op], __ATOMIC_RELAXED);
            return 1;
        }
    }
    return 0;
}
#define FAULT(op) (faulted(op))
#else
#define FAULT(op) 0
#endif

/* The device's syscalls, where a test build injects faults. Only these: the lane's own
 * control and notify eventfds and its epoll set are not a device's. */
static inline int dev_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    return FAULT(F_EPOLL_CTL) ? -1 : epoll_ctl(epfd, op, fd, ev);
}

static inline int dev_ioctl(int fd, unsigned long request, void *arg)
{
    return FAULT(F_IOCTL) ? -1 : ioctl(fd, request, arg);
}

static int64_t bucket_bounds[MAX_BUCKETS];
static Py_ssize_t n_bounds = -1; /* set by set_buckets(), while no lane exists */
static Py_ssize_t n_lanes;       /* lanes alive (GIL) */

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
    /* under the lane's mutex: */
    int owner;  /* OWN_* */
    int queued; /* in the lane's handed_back list, for dispatch() */
    uint64_t unwatched_round; /* the lane's round when the fds last left its epoll set */
    int owes_unmask;     /* the lane ended an interrupt it could not unmask for ... */
    int64_t owed_unmask; /* ... whose EOI it read then */
    uint64_t carried;    /* a count read and not acted on (declined), for the runner */
    int carried_eoi;     /* ... read from eoi (else from trigger) */
    int state, adopting; /* adopting: Channel.adopting (a trigger as from ARMED) */
    int64_t pending_since, timer_at, tat, backoff;
    int64_t eoi_timeout, interval, limit, half, backoff_initial, loop_timer_at;
    int unmask_on_spurious, has_policy;
    /* counted so far (never reset); dirty: anything at all */
    int dirty;
    uint64_t counters[N_COUNTERS];
    uint64_t buckets[N_HISTOGRAMS][MAX_BUCKETS + 1];
    uint64_t sums[N_HISTOGRAMS];
} FastPath;

/* A thread inside a write that may block (see guarded_write): since when, or 0. */
typedef struct {
    int64_t since; /* atomic */
    pthread_t thread;
} Guard;

struct Lane {
    PyObject_HEAD
    int initialised, closing, closed, threaded, started, sentinel_started;
    int epfd, control_fd, notify_fd;
    int rebuild; /* a registration could not be removed: build a new epoll set (mu held) */
    int dead;    /* epoll_wait failed: the lane gave every device back and takes none */
    pthread_t thread, sentinel;
    pthread_mutex_t mu;
    /* The sentinel's own: a write it must interrupt waits with mu held, so the sentinel
     * never takes mu (it would wait for the write it is there to end). */
    pthread_mutex_t sentinel_mu;
    pthread_cond_t stop_cond; /* wakes the sentinel at close(), with sentinel_mu */
    int stop_sentinel;
    Guard guards[2]; /* the lane's thread, and the event loop's (Lane.signal) */
    uint64_t guarded;    /* atomic: guarded writes begun (see sentinel_main) */
    int sentinel_asleep; /* atomic: the sentinel waits for the next guarded write */
    FastPath **slots; /* owned references */
    uint32_t *generations; /* bumped when a slot is freed: stale epoll events are skipped */
    uint32_t *handed_back; /* slots waiting for dispatch() */
    Py_ssize_t n_slots, n_handed_back;
    uint64_t pongs; /* atomic: pings answered by the lane's thread (the watchdog's check) */
    uint64_t round; /* rounds acted on (mu held) */
    int64_t clock; /* the last reading of the clock (mu held; see lane_tick) */
    int clock_injected; /* poll(now): the time of this round is ``injected_now`` (tests) */
    int64_t injected_now;
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

/* The lane reads the clock once a round starts and again after each write (the reading
 * the latency it observes ends with), not once an event: an event's time is the last
 * reading, at most one non-blocking syscall earlier (bench/RESULTS.md, "What separates the
 * lane from C": the clock was a sixth of the lane's extra cost over the C baseline). */
static inline void lane_tick(Lane *lane)
{
    lane->clock = now_ns();
}

/* The time of what the lane does now: its last reading, or the time poll(now) was given
 * (a thread-less lane in tests). */
static inline int64_t lane_time(Lane *lane)
{
    return lane->clock_injected ? lane->injected_now : lane->clock;
}

/* An eventfd's count, without ever blocking, whatever its file's O_NONBLOCK says: a
 * consumer holds a dup() of eoi (so the same open file, the same flags) and may clear
 * O_NONBLOCK on it, or read the count first. preadv2(RWF_NOWAIT) fails with EAGAIN instead
 * of waiting (eventfd reads honour IOCB_NOWAIT, Linux 5.12+; fs/eventfd.c). Where the
 * kernel refuses the flag, poll() first: then only this process reads trigger, and
 * consumers cannot take eoi's count between poll() and read() without ending their own
 * interrupt. Returns 0, or -1 with errno (EAGAIN: nothing). */
static int nb_read(int fd, uint64_t *count)
{
    if (FAULT(F_READ))
        return -1;
    struct iovec iov = {.iov_base = count, .iov_len = sizeof *count};
    ssize_t n = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
    if (n < 0 && (errno == EOPNOTSUPP || errno == EINVAL)) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 0) == 0) {
            errno = EAGAIN;
            return -1;
        }
        n = read(fd, count, sizeof *count);
    }
    if (n == sizeof *count)
        return 0;
    if (n >= 0)
        errno = EIO;
    return -1;
}

/* A guarded write begins: count it, and wake the sentinel if it sleeps. Only the first
 * write after a quiet second pays for that (a mutex and a futex wake); the others pay
 * one atomic add. */
static void wake_sentinel(Lane *lane)
{
    __atomic_add_fetch(&lane->guarded, 1, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&lane->sentinel_asleep, __ATOMIC_SEQ_CST))
        return;
    pthread_mutex_lock(&lane->sentinel_mu);
    __atomic_store_n(&lane->sentinel_asleep, 0, __ATOMIC_SEQ_CST);
    pthread_cond_signal(&lane->stop_cond);
    pthread_mutex_unlock(&lane->sentinel_mu);
}

/* Add to an eventfd another process also holds, without hanging on it: an eventfd write
 * waits while the count would pass 2**64 - 2 unless the file has O_NONBLOCK, and a consumer
 * shares irq's file (a dup()) and may clear that flag and fill the count. There is no
 * per-call non-blocking eventfd write (no RWF_NOWAIT: eventfd has no write_iter), so the
 * write is checked first (the deterministic case): while the file still has O_NONBLOCK
 * (fcntl F_GETFL, the cheapest syscall there is) the write cannot wait, it fails with
 * EAGAIN on a full count; a file without it (a consumer cleared it) is poll()ed, and
 * written only when there is room. A consumer that clears the flag, or fills the count,
 * between that check and the write could still make the write wait (the same race either
 * way: a full count and a blocking file at the moment of the write): the lane's sentinel
 * thread interrupts any guarded write older than RESCUE_AFTER_NS with RESCUE_SIGNAL (a
 * no-op handler without SA_RESTART: the write fails with EINTR). So a misbehaving consumer
 * costs its own device a forward error, and the lane at most 50 ms. ``start``: the time
 * the guard counts from (the caller's last clock reading: at or before the write).
 * ``shared``: 0 for the unmask eventfd, which is eoid's own (made with EFD_NONBLOCK) and
 * shared with the backend that plays the kernel only, never with a consumer: no check,
 * as the runner's own unmask (SimDevice.unmask) writes it without one; still guarded.
 * Returns 0, or -1 with errno. */
static int guarded_write(Lane *lane, Guard *guard, int fd, uint64_t value, int64_t start,
                         int shared)
{
    if (FAULT(F_WRITE))
        return -1;
    int flags = !shared || FAULT(F_RACE) ? O_NONBLOCK : fcntl(fd, F_GETFL);
    if (flags < 0)
        return -1;
    if (!(flags & O_NONBLOCK)) {
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int ready = poll(&p, 1, 0);
        if (ready < 0)
            return -1;
        if (ready == 0 || !(p.revents & POLLOUT)) {
            errno = EAGAIN;
            return -1;
        }
    }
    __atomic_store_n(&guard->thread, pthread_self(), __ATOMIC_RELAXED); /* read by the
                                                    sentinel, which does not hold mu */
    __atomic_store_n(&guard->since, start, __ATOMIC_RELEASE);
    wake_sentinel(lane);
    ssize_t n = write(fd, &value, sizeof value);
    __atomic_store_n(&guard->since, 0, __ATOMIC_RELEASE);
    return n == sizeof value ? 0 : -1;
}

/* The lane's own eventfds (control, notify): never shared, never full. */
static inline int add_to_eventfd(int fd, uint64_t value)
{
    return write(fd, &value, sizeof value) == sizeof value ? 0 : -1;
}

static void on_rescue(int sig)
{
    (void)sig; /* only there to interrupt a write (EINTR) */
}

/* Every SENTINEL_PERIOD_NS, interrupt a guarded write older than RESCUE_AFTER_NS. After
 * SENTINEL_QUIET_PERIODS without a guarded write (an idle daemon, or every device on the
 * kernel's path) it sleeps until the next one begins (wake_sentinel), so that a quiet
 * eoid does not wake 40 times a second. Going to sleep is a Dekker handshake with
 * wake_sentinel (both sequentially consistent): the sentinel sets ``sentinel_asleep``,
 * then reads ``guarded`` again; a writer adds to ``guarded``, then reads
 * ``sentinel_asleep``: at least one of them sees the other, so no write goes unwatched. */
static void *sentinel_main(void *arg)
{
    Lane *lane = arg;
    uint64_t seen = 0;
    int quiet = 0;
    pthread_mutex_lock(&lane->sentinel_mu);
    while (!lane->stop_sentinel) {
        if (__atomic_load_n(&lane->sentinel_asleep, __ATOMIC_SEQ_CST)) {
            pthread_cond_wait(&lane->stop_cond, &lane->sentinel_mu);
            continue;
        }
        struct timespec at;
        clock_gettime(CLOCK_MONOTONIC, &at);
        at.tv_nsec += SENTINEL_PERIOD_NS;
        if (at.tv_nsec >= 1000000000L) {
            at.tv_sec++;
            at.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&lane->stop_cond, &lane->sentinel_mu, &at);
        /* a guard is read without mu (atomics) */
        int64_t now = now_ns();
        int writing = 0;
        for (int i = 0; i < 2; i++) {
            int64_t since = __atomic_load_n(&lane->guards[i].since, __ATOMIC_ACQUIRE);
            writing |= since != 0;
            if (since != 0 && now - since > RESCUE_AFTER_NS)
                pthread_kill(__atomic_load_n(&lane->guards[i].thread, __ATOMIC_RELAXED),
                             RESCUE_SIGNAL);
        }
        uint64_t guarded = __atomic_load_n(&lane->guarded, __ATOMIC_SEQ_CST);
        quiet = guarded == seen && !writing ? quiet + 1 : 0;
        seen = guarded;
        if (quiet >= SENTINEL_QUIET_PERIODS) {
            quiet = 0;
            __atomic_store_n(&lane->sentinel_asleep, 1, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&lane->guarded, __ATOMIC_SEQ_CST) != seen)
                __atomic_store_n(&lane->sentinel_asleep, 0, __ATOMIC_SEQ_CST);
        }
    }
    pthread_mutex_unlock(&lane->sentinel_mu);
    return NULL;
}

/* The channel's rules, repeated (eoid/channel.py, Channel.trigger and Channel.eoi); the
 * arithmetic is done in 128 bits so that every int64 value Python may lend gives Python's
 * answer, or, where Python's answer would not fit in int64, a decline. */
typedef __int128 wide;

static inline int64_t clamp(wide v)
{
    return v > INT64_MAX ? INT64_MAX : v < INT64_MIN ? INT64_MIN : (int64_t)v;
}

static int fast_trigger(Lane *lane, FastPath *f, int64_t count, int64_t now)
{
    wide deadline = (wide)now + f->eoi_timeout;
    if ((f->state != ST_ARMED && !f->adopting) || (wide)f->loop_timer_at > deadline
        || deadline > INT64_MAX || deadline < INT64_MIN)
        return DECLINED;
    f->dirty = 1;
    f->adopting = 0;
    f->counters[C_INTERRUPTS] += (uint64_t)count;
    f->counters[C_COALESCED] += (uint64_t)count - 1;
    f->state = ST_PENDING;
    f->pending_since = now;
    f->timer_at = (int64_t)deadline;
    int failed = guarded_write(lane, &lane->guards[0], f->irq_fd, 1, lane->clock, 1);
    lane_tick(lane);
    if (!failed) {
        f->counters[C_FORWARDS]++;
        observe(f, H_DISPATCH, clamp((wide)lane_time(lane) - now));
        return HANDLED;
    }
    f->counters[C_FORWARD_ERRORS]++;
    return HANDLED_TELL; /* forwarded as the channel would; the runner logs the error */
}

static int fast_eoi(Lane *lane, FastPath *f, int64_t count, int64_t now)
{
    if (f->state == ST_ARMED && !f->unmask_on_spurious) { /* Channel.eoi: nothing pending */
        f->dirty = 1;
        f->counters[C_EOIS] += (uint64_t)count;
        f->counters[C_SPURIOUS] += (uint64_t)count;
        return HANDLED;
    }
    if (f->state != ST_PENDING || f->adopting) /* adopting: the runner reads trigger first */
        return DECLINED;
    /* Channel._take_token: GCRA. Decided before anything changes, so that a throttled
     * EOI reaches the channel exactly as if the fast path did not exist. */
    wide tat = f->tat;
    int refilled = tat - now <= f->half;
    if (refilled && tat < now)
        tat = now;
    tat += f->interval;
    if (tat - now > f->limit || tat > INT64_MAX)
        return DECLINED;
    if (refilled)
        f->backoff = f->backoff_initial;
    f->tat = (int64_t)tat;
    f->dirty = 1;
    f->counters[C_EOIS] += (uint64_t)count;
    observe(f, H_SERVICE, clamp((wide)now - f->pending_since));
    f->state = ST_ARMED;
    f->timer_at = NO_TIME;
    int failed = f->unmask_fd < 0 ? 1
        : f->unmask_request ? dev_ioctl(f->unmask_fd, f->unmask_request, f->unmask_arg) < 0
        : guarded_write(lane, &lane->guards[0], f->unmask_fd, 1, lane->clock, 0) < 0;
    lane_tick(lane);
    if (failed) { /* the runner unmasks through the device, which explains any error */
        if (f->unmask_fd >= 0)
            f->counters[C_UNMASK_ERRORS]++;
        f->owes_unmask = 1;
        f->owed_unmask = now;
        return OWES_UNMASK;
    }
    f->counters[C_UNMASKS]++;
    observe(f, H_UNMASK, clamp((wide)lane_time(lane) - now));
    return HANDLED;
}
static inline uint64_t event_key(Lane *lane, FastPath *f, int eoi)
{
    return (uint64_t)lane->generations[f->slot] << 32 | (uint64_t)f->slot << 1 | (uint64_t)eoi;
}

/* Put the fds in the epoll set (mu held). */
static int watch_fds(Lane *lane, int epfd, FastPath *f)
{
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = event_key(lane, f, 0);
    if (dev_epoll_ctl(epfd, EPOLL_CTL_ADD, f->trigger_fd, &ev) < 0)
        return -1;
    ev.data.u64 = event_key(lane, f, 1);
    if (dev_epoll_ctl(epfd, EPOLL_CTL_ADD, f->eoi_fd, &ev) < 0) {
        int saved = errno;
        if (dev_epoll_ctl(epfd, EPOLL_CTL_DEL, f->trigger_fd, NULL) < 0 && errno != ENOENT) {
            f->counters[C_EPOLL_ERRORS]++;
            lane->rebuild = 1;
        }
        errno = saved;
        return -1;
    }
    return 0;
}

/* Take the fds out of the epoll set (mu held). One that cannot be taken out (EBADF for a
 * closed fd whose file lives on in a consumer's dup, or an injected fault) would keep
 * waking the lane for ever: the lane then builds a new epoll set (lane_rebuild). */
static void unwatch_fds(Lane *lane, FastPath *f)
{
    int fds[2] = {f->trigger_fd, f->eoi_fd};
    f->unwatched_round = lane->round;
    for (int i = 0; i < 2; i++) {
        if (dev_epoll_ctl(lane->epfd, EPOLL_CTL_DEL, fds[i], NULL) < 0 && errno != ENOENT) {
            f->dirty = 1;
            f->counters[C_EPOLL_ERRORS]++;
            lane->rebuild = 1;
        }
    }
}

/* The lane stops acting for f, and tells the event loop (mu held). */
static void hand_back(Lane *lane, FastPath *f)
{
    if (f->owner == OWN_LANE) {
        unwatch_fds(lane, f);
        f->owner = OWN_RETURNED;
    }
    if (!f->queued) {
        f->queued = 1;
        lane->handed_back[lane->n_handed_back++] = f->slot;
    }
}

/* A new epoll set holding the control fd and the fds of every device the lane acts for
 * (mu held, on the thread that waits on the set, or before it starts). A device whose fds
 * cannot be added is handed back. Returns whether the event loop must be told. */
static int lane_rebuild(Lane *lane)
{
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        return 0; /* rebuild stays set: tried again next round */
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = CONTROL_KEY};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lane->control_fd, &ev) < 0
        || dup3(epfd, lane->epfd, O_CLOEXEC) < 0) {
        close(epfd);
        return 0;
    }
    close(epfd);
    lane->rebuild = 0;
    int notify = 0;
    for (Py_ssize_t i = 0; i < lane->n_slots; i++) {
        FastPath *f = lane->slots[i];
        if (f != NULL && f->owner == OWN_LANE && watch_fds(lane, lane->epfd, f) < 0) {
            f->dirty = 1;
            f->counters[C_EPOLL_ERRORS]++;
            f->owner = OWN_RETURNED; /* nothing of it in the new set */
            hand_back(lane, f);
            notify = 1;
        }
    }
    return notify;
}

/* One device event (mu held); returns whether the event loop must be told. */
static int lane_event(Lane *lane, uint64_t key)
{
    uint32_t slot = (uint32_t)(key & 0xFFFFFFFF) >> 1, eoi = key & 1;
    FastPath *f = slot < lane->n_slots ? lane->slots[slot] : NULL;
    if (f == NULL || lane->generations[slot] != (uint32_t)(key >> 32)) {
        lane->rebuild = 1; /* a device removed: its registration cannot be named any more */
        return 0;
    }
    if (f->owner != OWN_LANE) {
        /* Handed back earlier in this round: its fds are out of the set already. Else a
         * registration left behind (its removal failed, or the fd was closed while a dup
         * keeps the file open, so that the number may even name another file now): it
         * would wake the lane for ever, so the set is built anew. */
        if (f->unwatched_round != lane->round)
            lane->rebuild = 1;
        return 0;
    }
    int fd = eoi ? f->eoi_fd : f->trigger_fd;
    uint64_t count;
    if (nb_read(fd, &count) < 0) {
        if (errno == EAGAIN)
            return 0; /* a consumer read its own EOI eventfd first */
        f->dirty = 1;
        f->counters[C_READ_ERRORS]++;
        hand_back(lane, f); /* the runner reads it on the loop, and reports */
        return 1;
    }
    int64_t now = lane_time(lane);
    int done = count > INT64_MAX ? DECLINED /* a consumer's EOI count: the channel's */
        : eoi ? fast_eoi(lane, f, (int64_t)count, now)
        : fast_trigger(lane, f, (int64_t)count, now);
    if (done == HANDLED)
        return 0;
    if (done == DECLINED) { /* as if never read: reclaim() gives it to the runner */
        f->carried = count;
        f->carried_eoi = (int)eoi;
    }
    hand_back(lane, f);
    return 1;
}

/* Everything that woke the lane, under its mutex. Returns 1 when told to stop. */
static int lane_act(Lane *lane, struct epoll_event *events, int n, int *notify)
{
    int stop = 0;
    lane->round++;
    lane_tick(lane);
    for (int i = 0; i < n; i++) {
        uint64_t key = events[i].data.u64;
        if (key == CONTROL_KEY) {
            uint64_t value;
            if (read(lane->control_fd, &value, sizeof value) == sizeof value) {
                __atomic_add_fetch(&lane->pongs, value & 0xFFFFFFFF, __ATOMIC_RELAXED);
                stop |= value >> 32 != 0;
            }
        } else {
            *notify |= lane_event(lane, key);
        }
    }
    if (lane->rebuild)
        *notify |= lane_rebuild(lane);
    return stop;
}

/* epoll_wait failed for another reason than a signal: it will not work again. Every device
 * goes back to the event loop, and the lane takes no more (mu held). */
static void lane_die(Lane *lane)
{
    lane->dead = 1;
    for (Py_ssize_t i = 0; i < lane->n_slots; i++) {
        FastPath *f = lane->slots[i];
        if (f != NULL && f->owner == OWN_LANE)
            hand_back(lane, f);
    }
}

/* One round: wait (timeout ms, -1 forever), act. Returns 1 when told to stop, or when
 * the lane died. */
static int lane_round(Lane *lane, int timeout)
{
    struct epoll_event events[BATCH];
    int n = epoll_wait(lane->epfd, events, BATCH, timeout);
    if (n < 0 && errno == EINTR)
        return 0;
    int stop = 0, notify = 0;
    pthread_mutex_lock(&lane->mu);
    if (n < 0) {
        lane_die(lane);
        notify = stop = 1;
    } else {
        stop = lane_act(lane, events, n, &notify);
    }
    pthread_mutex_unlock(&lane->mu);
    if (notify)
        add_to_eventfd(lane->notify_fd, 1);
    return stop;
}

static void *lane_main(void *arg)
{
    Lane *lane = arg;
    sigset_t rescue; /* every other signal is blocked (lane_init): Python handles them */
    sigemptyset(&rescue);
    sigaddset(&rescue, RESCUE_SIGNAL);
    pthread_sigmask(SIG_UNBLOCK, &rescue, NULL);
    while (!lane_round(lane, -1))
        ;
    return NULL;
}

/* --- FastPath: the runner's side (GIL held) ------------------------------------------------ */

/* The lane's mutex, from a thread holding the GIL: if the lane holds it (for at most one
 * round: no syscall under it may block, see guarded_write), wait without the GIL, so that
 * other Python threads (the metrics exporter) are not held up as well. */
static void lane_lock(Lane *lane)
{
    if (pthread_mutex_trylock(&lane->mu) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&lane->mu);
    Py_END_ALLOW_THREADS
}

static PyTypeObject ReleasedType, CountsType;

static PyStructSequence_Field released_fields[] = {
    {"state", "eoid.channel.State: ARMED or PENDING"},
    {"pending_since", "when the pending interrupt was forwarded (ns)"},
    {"timer_at", "the EOI deadline, or NO_TIME"},
    {"tat", "the storm limiter's theoretical arrival time (Channel._take_token)"},
    {"backoff", "the storm backoff (ns)"},
    {"owed_unmask", "when the EOI of an unmask the runner still owes was read"},
    {"owes_unmask", "whether the runner owes an unmask (the lane could not issue it)"},
    {"carried", "a count the lane read and did not act on (the runner's to handle), or 0"},
    {"carried_eoi", "whether ``carried`` came from eoi (else from trigger)"},
    {"adopting", "whether the line is still taken over with its state unknown"},
    {NULL, NULL},
};
static PyStructSequence_Desc released_desc = {
    "eoid._fastpath.Released", "The state the lane gives back (FastPath.reclaim).",
    released_fields, 10};

static PyStructSequence_Field counts_fields[] = {
    {"interrupts", NULL}, {"coalesced", NULL}, {"eois", NULL}, {"forwards", NULL},
    {"unmasks", NULL}, {"forward_errors", NULL}, {"spurious", NULL},
    {"unmask_errors", "raw unmasks that failed (the runner then unmasks)"},
    {"read_errors", "trigger or eoi reads that failed (the device was handed back)"},
    {"epoll_errors", "epoll_ctl calls that failed"},
    {"service", "histogram counts (eoid.stats.BUCKETS_NS, then +Inf)"}, {"service_ns", NULL},
    {"dispatch", NULL}, {"dispatch_ns", NULL}, {"unmask", NULL}, {"unmask_ns", NULL},
    {NULL, NULL},
};
static PyStructSequence_Desc counts_desc = {
    "eoid._fastpath.Counts", "What a FastPath counted so far (never reset).", counts_fields,
    N_COUNTERS + 2 * N_HISTOGRAMS};

static PyObject *lane_closed_error(void)
{
    PyErr_SetString(PyExc_ValueError, "the lane is closed");
    return NULL;
}

static PyObject *fp_set_policy(FastPath *self, PyObject *args)
{
    long long eoi_timeout, interval, limit, half, backoff_initial;
    int unmask_on_spurious;
    if (!PyArg_ParseTuple(args, "LLLLLp:set_policy", &eoi_timeout, &interval, &limit, &half,
                          &backoff_initial, &unmask_on_spurious))
        return NULL;
    Lane *lane = self->lane;
    if (lane != NULL)
        lane_lock(lane);
    int lent = self->owner != OWN_LOOP;
    if (!lent) {
        self->eoi_timeout = eoi_timeout;
        self->interval = interval;
        self->limit = limit;
        self->half = half;
        self->backoff_initial = backoff_initial;
        self->unmask_on_spurious = unmask_on_spurious;
        self->has_policy = 1;
    }
    if (lane != NULL)
        pthread_mutex_unlock(&lane->mu);
    if (lent) {
        PyErr_SetString(PyExc_RuntimeError, "the policy changes while the state is reclaimed");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *fp_lend(FastPath *self, PyObject *args)
{
    long long state, pending_since, timer_at, tat, backoff, loop_timer_at;
    int adopting = 0;
    if (!PyArg_ParseTuple(args, "LLLLLL|p:lend", &state, &pending_since, &timer_at, &tat,
                          &backoff, &loop_timer_at, &adopting))
        return NULL;
    if ((state != ST_ARMED && state != ST_PENDING) || (adopting && state != ST_PENDING)) {
        PyErr_Format(PyExc_ValueError, "the fast path runs ARMED and PENDING (and PENDING"
                     " adopting) only, not %lld%s", state, adopting ? " adopting" : "");
        return NULL;
    }
    Lane *lane = self->lane;
    if (lane == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "not on a lane (Lane.add)");
        return NULL;
    }
    lane_lock(lane);
    const char *refused = lane->dead || lane->closing ? "the lane stopped"
        : self->owner != OWN_LOOP ? "already lent: reclaim() first"
        : !self->has_policy ? "no policy: set_policy() first" : NULL;
    if (refused != NULL) {
        pthread_mutex_unlock(&lane->mu);
        PyErr_SetString(PyExc_RuntimeError, refused);
        return NULL;
    }
    self->state = (int)state;
    self->adopting = adopting;
    self->pending_since = pending_since;
    self->timer_at = timer_at;
    self->tat = tat;
    self->backoff = backoff;
    self->loop_timer_at = loop_timer_at;
    self->owes_unmask = 0;
    self->carried = 0;
    int failed = watch_fds(lane, lane->epfd, self);
    int saved = errno;
    if (failed) {
        self->dirty = 1;
        self->counters[C_EPOLL_ERRORS]++;
    } else {
        self->owner = OWN_LANE;
    }
    pthread_mutex_unlock(&lane->mu);
    if (failed) {
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static int set_field(PyObject *record, Py_ssize_t i, PyObject *value)
{
    if (value == NULL)
        return -1;
    PyStructSequence_SET_ITEM(record, i, value);
    return 0;
}

/* A loop timer fired while the lane holds the state: if nothing is due (no EOI deadline,
 * or one after ``now``), the lane keeps it, and the next loop timer is the earlier of
 * ``cover`` and that deadline (returned; the runner sets it). Else None: the runner takes
 * the state back and lets the channel act, as for any timer. */
static PyObject *fp_keep(FastPath *self, PyObject *args)
{
    long long now, cover;
    if (!PyArg_ParseTuple(args, "LL:keep", &now, &cover))
        return NULL;
    Lane *lane = self->lane;
    if (lane == NULL)
        Py_RETURN_NONE;
    lane_lock(lane);
    int kept = self->owner == OWN_LANE && !lane->dead && !lane->closing
        && (self->timer_at == NO_TIME || self->timer_at > now);
    int64_t at = self->timer_at < cover ? self->timer_at : cover;
    if (kept)
        self->loop_timer_at = at;
    pthread_mutex_unlock(&lane->mu);
    if (!kept)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(at);
}

static PyObject *fp_reclaim(FastPath *self, PyObject *Py_UNUSED(ignored))
{
    Lane *lane = self->lane;
    if (lane == NULL)
        Py_RETURN_NONE;
    lane_lock(lane);
    if (self->owner == OWN_LOOP) {
        pthread_mutex_unlock(&lane->mu);
        Py_RETURN_NONE;
    }
    if (self->owner == OWN_LANE) {
        unwatch_fds(lane, self);
        self->owner = OWN_RETURNED; /* the lane no longer acts: the fields stay as they are */
    }
    int64_t v[6] = {self->state, self->pending_since, self->timer_at, self->tat,
                    self->backoff, self->owed_unmask};
    int owes_unmask = self->owes_unmask;
    uint64_t carried = self->carried;
    int carried_eoi = self->carried_eoi, adopting = self->adopting;
    int wake = lane->rebuild;
    pthread_mutex_unlock(&lane->mu);
    if (wake) /* a registration could not be removed: the lane's thread rebuilds its set */
        add_to_eventfd(lane->control_fd, 1);
    /* Built before the state leaves the lane: if memory runs out, it stays RETURNED here,
     * with any unmask owed, for the next reclaim(). */
    PyObject *record = PyStructSequence_New(&ReleasedType);
    if (record == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < 6; i++) {
        if (set_field(record, i, PyLong_FromLongLong(v[i])) < 0) {
            Py_DECREF(record);
            return NULL;
        }
    }
    if (set_field(record, 6, PyBool_FromLong(owes_unmask)) < 0
        || set_field(record, 7, PyLong_FromUnsignedLongLong(carried)) < 0
        || set_field(record, 8, PyBool_FromLong(carried_eoi)) < 0
        || set_field(record, 9, PyBool_FromLong(adopting)) < 0) {
        Py_DECREF(record);
        return NULL;
    }
    lane_lock(lane);
    self->owner = OWN_LOOP;
    self->owes_unmask = 0;
    self->carried = 0;
    pthread_mutex_unlock(&lane->mu);
    return record;
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
    Lane *lane = self->lane;
    if (lane != NULL)
        lane_lock(lane);
    memset(self->unmask_arg, 0, sizeof self->unmask_arg);
    if (arglen)
        memcpy(self->unmask_arg, arg, (size_t)arglen);
    self->unmask_fd = fd;
    self->unmask_request = request;
    if (lane != NULL)
        pthread_mutex_unlock(&lane->mu);
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
    Lane *lane = self->lane;
    if (lane != NULL) /* a consistent copy; Python objects are made outside the lock */
        lane_lock(lane);
    int dirty = self->dirty;
    memcpy(counters, self->counters, sizeof counters);
    memcpy(buckets, self->buckets, sizeof buckets);
    memcpy(sums, self->sums, sizeof sums);
    if (lane != NULL)
        pthread_mutex_unlock(&lane->mu);
    if (!dirty)
        Py_RETURN_NONE;
    PyObject *out = PyStructSequence_New(&CountsType);
    if (out == NULL)
        return NULL;
    Py_ssize_t k = 0;
    int failed = 0;
    for (int c = 0; c < N_COUNTERS; c++)
        failed |= set_field(out, k++, PyLong_FromUnsignedLongLong(counters[c]));
    for (int h = 0; h < N_HISTOGRAMS; h++) {
        failed |= set_field(out, k++, histogram_tuple(buckets[h]));
        failed |= set_field(out, k++, PyLong_FromUnsignedLongLong(sums[h]));
    }
    if (failed) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *fp_get_state(FastPath *self, void *Py_UNUSED(closure))
{
    Lane *lane = self->lane;
    if (lane != NULL)
        lane_lock(lane);
    int state = self->state;
    if (lane != NULL)
        pthread_mutex_unlock(&lane->mu);
    return PyLong_FromLong(state);
}

static PyObject *fp_get_interrupts(FastPath *self, void *Py_UNUSED(closure))
{
    Lane *lane = self->lane;
    if (lane != NULL)
        lane_lock(lane);
    uint64_t interrupts = self->counters[C_INTERRUPTS];
    if (lane != NULL)
        pthread_mutex_unlock(&lane->mu);
    return PyLong_FromUnsignedLongLong(interrupts);
}

static PyObject *fp_get_errors(FastPath *self, void *Py_UNUSED(closure))
{
    Lane *lane = self->lane;
    if (lane != NULL)
        lane_lock(lane);
    uint64_t e[4] = {self->counters[C_FORWARD_ERRORS], self->counters[C_UNMASK_ERRORS],
                     self->counters[C_READ_ERRORS], self->counters[C_EPOLL_ERRORS]};
    if (lane != NULL)
        pthread_mutex_unlock(&lane->mu);
    return Py_BuildValue("(KKKK)", (unsigned long long)e[0], (unsigned long long)e[1],
                         (unsigned long long)e[2], (unsigned long long)e[3]);
}

static PyObject *fp_get_lent(FastPath *self, void *Py_UNUSED(closure))
{
    Lane *lane = self->lane;
    if (lane != NULL)
        lane_lock(lane);
    int lent = self->owner != OWN_LOOP;
    if (lane != NULL)
        pthread_mutex_unlock(&lane->mu);
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
    {"set_policy", (PyCFunction)fp_set_policy, METH_VARARGS,
     "set_policy(eoi_timeout, interval, limit, half, backoff_initial, unmask_on_spurious):"
     " what the lane needs of the policy (Channel.fast_policy), sent once and on reload,"
     " while the state is not lent."},
    {"lend", (PyCFunction)fp_lend, METH_VARARGS,
     "lend(state, pending_since, timer_at, tat, backoff, loop_timer_at, adopting=False):"
     " the lane owns the state and reads the eventfds from now on."},
    {"keep", (PyCFunction)fp_keep, METH_VARARGS,
     "keep(now, cover): a loop timer fired; if nothing is due, the lane keeps the state and"
     " the time of the next loop timer is returned (the earlier of cover and the EOI"
     " deadline), else None (reclaim, and let the channel act)."},
    {"reclaim", (PyCFunction)fp_reclaim, METH_NOARGS,
     "Take the state back: a Released record, or None if it was not lent."},
    {"set_unmask", (PyCFunction)fp_set_unmask, METH_VARARGS,
     "set_unmask(fd, request=0, arg=b''): ioctl(fd, request, arg), or an eventfd write when"
     " request is 0 (an eventfd no consumer holds: written without guarded_write's"
     " check); fd -1: the runner unmasks."},
    {"counts", (PyCFunction)fp_counts, METH_NOARGS,
     "Everything counted so far (a Counts record), or None if nothing was."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef fp_getset[] = {
    {"state", (getter)fp_get_state, NULL, "the state while lent", NULL},
    {"interrupts", (getter)fp_get_interrupts, NULL, "interrupts counted here so far", NULL},
    {"lent", (getter)fp_get_lent, NULL, "whether the state is here", NULL},
    {"errors", (getter)fp_get_errors, NULL,
     "(forward, unmask, read, epoll) errors counted here so far: counts() without the"
     " histograms, for each reclaim", NULL},
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
    if (!self->initialised || self->closing)
        return lane_closed_error();
    lane_lock(self);
    Py_ssize_t slot = 0;
    while (slot < self->n_slots && self->slots[slot] != NULL)
        slot++;
    if (slot == self->n_slots) {
        Py_ssize_t n = self->n_slots ? 2 * self->n_slots : 64;
        FastPath **slots = PyMem_RawRealloc(self->slots, (size_t)n * sizeof *slots);
        if (slots != NULL)
            self->slots = slots;
        uint32_t *gens = PyMem_RawRealloc(self->generations, (size_t)n * sizeof *gens);
        if (gens != NULL)
            self->generations = gens;
        uint32_t *back = PyMem_RawRealloc(self->handed_back, (size_t)n * sizeof *back);
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
    f->owner = OWN_LOOP;
    f->queued = 0;
    pthread_mutex_unlock(&self->mu);
    Py_RETURN_NONE;
}

static void unqueue(Lane *lane, FastPath *f)
{
    if (!f->queued)
        return;
    for (Py_ssize_t i = 0; i < lane->n_handed_back; i++) {
        if (lane->handed_back[i] == f->slot) {
            lane->handed_back[i] = lane->handed_back[--lane->n_handed_back];
            break;
        }
    }
    f->queued = 0;
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
    lane_lock(self);
    if (f->owner == OWN_LANE)
        unwatch_fds(self, f); /* on failure, the lane rebuilds its set (wake it up) */
    int wake = self->rebuild;
    f->owner = OWN_LOOP;
    unqueue(self, f); /* its slot may be reused before dispatch(): no stale entry */
    self->slots[f->slot] = NULL;
    self->generations[f->slot]++;
    f->lane = NULL;
    pthread_mutex_unlock(&self->mu);
    if (wake)
        add_to_eventfd(self->control_fd, 1);
    Py_DECREF(f);
    Py_RETURN_NONE;
}

static PyObject *lane_dispatch(Lane *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->initialised || self->closing)
        return lane_closed_error();
    uint64_t value;
    if (read(self->notify_fd, &value, sizeof value) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *first_type = NULL, *first_value = NULL, *first_tb = NULL;
    for (;;) { /* one at a time: a callback may add, remove or hand back devices */
        lane_lock(self);
        FastPath *f = NULL;
        while (self->n_handed_back > 0 && f == NULL) {
            uint32_t slot = self->handed_back[--self->n_handed_back];
            f = self->slots[slot];
            if (f != NULL && f->queued) {
                f->queued = 0;
                Py_INCREF(f);
            } else {
                f = NULL;
            }
        }
        pthread_mutex_unlock(&self->mu);
        if (f == NULL)
            break;
        PyObject *callback = f->returned ? Py_NewRef(f->returned) : NULL;
        Py_DECREF(f);
        if (callback == NULL)
            continue;
        PyObject *r = PyObject_CallNoArgs(callback);
        Py_DECREF(callback);
        if (r != NULL) {
            Py_DECREF(r);
        } else if (first_type == NULL) { /* every other device is still called back */
            PyErr_Fetch(&first_type, &first_value, &first_tb);
        } else {
            PyErr_WriteUnraisable(self->closing ? NULL : (PyObject *)self);
        }
    }
    if (first_type != NULL) {
        PyErr_Restore(first_type, first_value, first_tb);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *lane_poll(Lane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"now", NULL};
    PyObject *now = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:poll", kwlist, &now))
        return NULL;
    if (!self->initialised || self->closing)
        return lane_closed_error();
    if (self->threaded) {
        PyErr_SetString(PyExc_RuntimeError, "a threaded lane polls on its own thread");
        return NULL;
    }
    if (now != Py_None) {
        long long t = PyLong_AsLongLong(now);
        if (t == -1 && PyErr_Occurred())
            return NULL;
        self->injected_now = t;
        self->clock_injected = 1;
    }
    lane_round(self, 0);
    self->clock_injected = 0;
    return lane_dispatch(self, NULL);
}

static PyObject *lane_ping(Lane *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->initialised || self->closing)
        return lane_closed_error();
    if (add_to_eventfd(self->control_fd, 1) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (!self->threaded)
        lane_round(self, 0);
    Py_RETURN_NONE;
}

static PyObject *lane_signal(Lane *self, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "not an fd");
        return NULL;
    }
    if (!self->initialised || self->closing)
        return lane_closed_error();
    if (guarded_write(self, &self->guards[1], (int)fd, 1, now_ns(), 1) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *lane_close(Lane *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->initialised || self->closing)
        Py_RETURN_NONE; /* idempotent, and a second caller must not join again */
    self->closing = 1;
    Py_BEGIN_ALLOW_THREADS
    if (self->started) {
        add_to_eventfd(self->control_fd, (uint64_t)1 << 32);
        pthread_join(self->thread, NULL);
    }
    if (self->sentinel_started) {
        pthread_mutex_lock(&self->sentinel_mu);
        self->stop_sentinel = 1;
        pthread_cond_signal(&self->stop_cond);
        pthread_mutex_unlock(&self->sentinel_mu);
        pthread_join(self->sentinel, NULL);
    }
    Py_END_ALLOW_THREADS
    self->started = self->sentinel_started = 0;
    self->n_handed_back = 0;
    for (Py_ssize_t i = 0; i < self->n_slots; i++) {
        FastPath *f = self->slots[i];
        if (f != NULL) {
            f->lane = NULL;
            f->owner = OWN_LOOP;
            f->queued = 0;
            self->slots[i] = NULL;
            Py_DECREF(f);
        }
    }
    close(self->epfd);
    close(self->control_fd);
    close(self->notify_fd);
    self->epfd = self->control_fd = self->notify_fd = -1;
    self->closed = 1;
    Py_RETURN_NONE;
}

static int rescue_installed;

/* A thread with every signal blocked: Python's handlers run on the main thread. */
static int start_thread(pthread_t *thread, void *(*main)(void *), void *arg, const char *name)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int err = pthread_create(thread, NULL, main, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err == 0)
        pthread_setname_np(*thread, name); /* named in ps, top and /proc */
    return err;
}

static int lane_init(Lane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"threaded", NULL};
    int threaded = 1;
    if (self->initialised) {
        PyErr_SetString(PyExc_RuntimeError, "a Lane cannot be re-initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:Lane", kwlist, &threaded))
        return -1;
    if (!rescue_installed) { /* see guarded_write; never over a handler someone set */
        struct sigaction old, sa = {.sa_handler = on_rescue};
        sigemptyset(&sa.sa_mask);
        if (sigaction(RESCUE_SIGNAL, NULL, &old) == 0
            && (old.sa_handler == SIG_DFL || old.sa_handler == SIG_IGN))
            sigaction(RESCUE_SIGNAL, &sa, NULL);
        rescue_installed = 1;
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->control_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = CONTROL_KEY};
    if (self->epfd < 0 || self->control_fd < 0 || self->notify_fd < 0
        || epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->control_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        for (int *fd = &self->epfd; fd <= &self->notify_fd; fd++) {
            if (*fd >= 0)
                close(*fd);
            *fd = -1;
        }
        return -1;
    }
    pthread_mutex_init(&self->mu, NULL);
    pthread_mutex_init(&self->sentinel_mu, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&self->stop_cond, &attr);
    pthread_condattr_destroy(&attr);
    self->initialised = 1;
    n_lanes++;
    self->threaded = threaded;
    int err = start_thread(&self->sentinel, sentinel_main, self, "eoid-sentinel");
    self->sentinel_started = err == 0;
    if (err == 0 && threaded) {
        err = start_thread(&self->thread, lane_main, self, "eoid-lane");
        self->started = err == 0;
    }
    if (err != 0) {
        Py_XDECREF(lane_close(self, NULL));
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
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
    if (self->initialised) {
        if (!self->closed)
            Py_XDECREF(lane_close(self, NULL));
        pthread_mutex_destroy(&self->mu);
        pthread_mutex_destroy(&self->sentinel_mu);
        pthread_cond_destroy(&self->stop_cond);
        n_lanes--;
    }
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
    /* without the mutex: the watchdog must see a lane that does not answer, whatever it
     * is stuck in */
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->pongs, __ATOMIC_RELAXED));
}

static PyObject *lane_get_alive(Lane *self, void *Py_UNUSED(closure))
{
    if (!self->initialised || self->closing)
        Py_RETURN_FALSE;
    lane_lock(self);
    int dead = self->dead;
    pthread_mutex_unlock(&self->mu);
    return PyBool_FromLong(!dead);
}

static PyMethodDef lane_methods[] = {
    {"add", (PyCFunction)lane_add, METH_O, "add(fast_path): a device joins the lane."},
    {"remove", (PyCFunction)lane_remove, METH_O,
     "remove(fast_path): the device leaves (its state, if lent, is dropped)."},
    {"dispatch", (PyCFunction)lane_dispatch, METH_NOARGS,
     "The event loop's reader of notify_fd: call ``returned`` of each device handed back"
     " (all of them, even when one raises: the first exception is raised at the end)."},
    {"poll", (PyCFunction)(void (*)(void))lane_poll, METH_VARARGS | METH_KEYWORDS,
     "poll(now=None): without a thread, one round on this thread at time ``now`` (the"
     " clock's if None), then dispatch() (tests)."},
    {"ping", (PyCFunction)lane_ping, METH_NOARGS,
     "Ask the lane's thread for a sign of life: ``pongs`` goes up when it answers."},
    {"signal", (PyCFunction)lane_signal, METH_O,
     "signal(fd): add 1 to an eventfd another process shares, never hanging on it (the"
     " event loop's forwards; see guarded_write). OSError (EAGAIN: full) if it cannot."},
    {"close", (PyCFunction)lane_close, METH_NOARGS,
     "Stop the thread and let every device go. Idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef lane_getset[] = {
    {"notify_fd", (getter)lane_get_notify_fd, NULL,
     "readable when devices were handed back: the event loop calls dispatch()", NULL},
    {"pongs", (getter)lane_get_pongs, NULL, "pings answered", NULL},
    {"alive", (getter)lane_get_alive, NULL,
     "False once closed, or once epoll_wait failed (every device was handed back)", NULL},
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
    int64_t values[MAX_BUCKETS];
    if (n > MAX_BUCKETS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many buckets");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        values[i] = v;
    }
    Py_DECREF(seq);
    int same = n == n_bounds && memcmp(values, bucket_bounds, (size_t)n * sizeof *values) == 0;
    if (same)
        Py_RETURN_NONE; /* nothing written: lanes may be reading them */
    if (n_lanes > 0) {
        PyErr_SetString(PyExc_ValueError, "the buckets cannot change while a lane exists");
        return NULL;
    }
    memcpy(bucket_bounds, values, (size_t)n * sizeof *values);
    n_bounds = n;
    Py_RETURN_NONE;
}

static PyObject *inject_fault(PyObject *Py_UNUSED(module), PyObject *args)
{
    const char *op;
    int count, err;
    if (!PyArg_ParseTuple(args, "sii:inject_fault", &op, &count, &err))
        return NULL;
#ifdef EOID_FAULT_INJECTION
    for (int i = 0; i < N_FAULTS; i++) {
        if (strcmp(op, fault_names[i]) == 0) {
            __atomic_store_n(&fault_errno[i], err, __ATOMIC_RELAXED);
            __atomic_store_n(&fault_left[i], count, __ATOMIC_RELAXED);
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_ValueError, "no such fault: %s", op);
    return NULL;
#else
    (void)op;
    (void)count;
    (void)err;
    PyErr_SetString(PyExc_RuntimeError, "built without EOID_FAULT_INJECTION");
    return NULL;
#endif
}

static PyMethodDef module_methods[] = {
    {"set_buckets", set_buckets, METH_O,
     "set_buckets(bounds_ns): the histograms' upper bounds (eoid.stats.BUCKETS_NS); they"
     " cannot change while a lane exists."},
    {"inject_fault", inject_fault, METH_VARARGS,
     "inject_fault(op, count, errno): the next ``count`` device calls of ``op`` (epoll_ctl,"
     " read, write, ioctl) fail with errno; ``race``: the next ``count`` guarded writes"
     " find room that is not there (test builds: -DEOID_FAULT_INJECTION)."},
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
    if (ReleasedType.tp_name == NULL
        && (PyStructSequence_InitType2(&ReleasedType, &released_desc) < 0
            || PyStructSequence_InitType2(&CountsType, &counts_desc) < 0))
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "FastPath", (PyObject *)&FastPathType) < 0 ||
        PyModule_AddObjectRef(m, "Lane", (PyObject *)&LaneType) < 0 ||
        PyModule_AddObjectRef(m, "Released", (PyObject *)&ReleasedType) < 0 ||
        PyModule_AddObjectRef(m, "Counts", (PyObject *)&CountsType) < 0 ||
        PyModule_AddIntConstant(m, "NO_TIME", NO_TIME) < 0 ||
        PyModule_AddIntConstant(m, "ARMED", ST_ARMED) < 0 ||
        PyModule_AddIntConstant(m, "PENDING", ST_PENDING) < 0 ||
#ifdef EOID_FAULT_INJECTION
        PyModule_AddIntConstant(m, "FAULT_INJECTION", 1) < 0 ||
#else
        PyModule_AddIntConstant(m, "FAULT_INJECTION", 0) < 0 ||
#endif
        PyModule_AddIntConstant(m, "RESCUE_SIGNAL", RESCUE_SIGNAL) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/* pump: interrupt load generator for an INTx relay (baseline or eoid).
 *
 * Handed each device's four eventfds, it plays the other three parties:
 *     the kernel:           write(trigger, 1) when the device fires
 *     the guest:            irq readable -> read(irq) -> write(eoi, 1)
 *     the simulated device: unmask readable -> read(unmask): line re-armed
 * A device is fired again only once its unmask has been seen, as a real
 * level-triggered line masked by VFIO would be.
 *
 * Usage:
 *     pump (--fds LIST | --fds-from FD) --mode closed|paced [--rate R]
 *          [--duration S] [--drain S] [--spin-us N] [--level]
 * LIST is "trigger,irq,eoi,unmask;..." (see common.h).
 *   closed: every device fires, and fires again as soon as it is re-armed,
 *           all concurrently, for --duration seconds (default 3).
 *   paced:  R interrupts/s in total, slot k at start + k/R going to device
 *           k mod N; a slot whose device is not re-armed by then is counted
 *           as skipped, not fired later (so a slow relay shows up as skips,
 *           not as a silently lower rate).
 * --spin-us N: when the next thing to do is at most N us away, poll epoll
 * instead of sleeping (default 0: always sleep). Only worth it when the pump
 * has a CPU of its own: it then keeps up at 100k/s and its own wakeups stay
 * out of the round trips; on the relay's CPU it would starve the relay.
 * Above the duration, the pump never sleeps.
 * --routes FD: play the kernel's datapath too (README, "Two datapaths"). FD is
 * a SOCK_SEQPACKET socket on which the sim stand-in (bench/run_eoid.py)
 * passes each route the daemon asks of a line, as the sim's ``route`` does
 * (eoid/sim/line.py): a 4-byte device index and, by SCM_RIGHTS, the new
 * trigger and optionally the eventfd to bind as the line's unmask (the
 * virqfd: on the kernel's path, the consumer's irq is the trigger and its
 * eoi the virqfd). With a virqfd it is bound first, then the trigger
 * swapped, and a count already in it unmasks; without, the trigger is
 * swapped, then the virqfd unbound. The masked state is kept. The pump
 * answers each route with its index once applied. A bound virqfd is read
 * as the kernel's virqfd reads it: the EOI unmasks the line, nobody wakes.
 * The daemon's own unmask eventfd keeps working meanwhile, as VFIO's does.
 * A route's fds may also come in the list: a fifth fd is a virqfd bound at
 * start.
 * --kernel-fires FD: a memfd of one uint64 per device, shared with the
 * stand-in, where fires on a line with a bound virqfd are counted (what
 * /proc/interrupts tells of a real line; the daemon asks the sim for it).
 * --level: model the line as vfio-pci presents a level-triggered one, for runs
 * where the relay restarts or its consumers re-attach (bench/soak.py): an
 * unmask of a line that is not masked is a no-op (counted, stray_unmasks); an
 * unmask while the guest has not yet serviced the device re-signals the
 * trigger (the line is still asserted: refires); an irq after the guest
 * already ended the interrupt is a redelivery (a re-attach delivers a held
 * interrupt again) that the guest acknowledges again (redelivered). The check
 * is then that every fire completed (fire -> ... -> unmask, completed = fired,
 * nothing in flight), not that the counters are equal.
 * Then, with no more fires, it waits up to --drain seconds (default 1) for
 * what is in flight, and prints one JSON line: counters, the firing window
 * and the fire -> unmask round-trip latency percentiles in microseconds.
 * Exit status 1 if fired, irq_received, eoi_sent and unmask_received
 * differ (with --level: if a fire did not complete) (an interrupt was lost or duplicated) or a syscall failed; 2 on a
 * usage error. SIGTERM/SIGINT end the firing window early.
 */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

/* epoll cookie: device index << 3 | kind */
enum { K_IRQ, K_UNMASK, K_VIRQFD, K_SIGNAL, K_ROUTES };
#define MAX_EVENTS 256

enum dev_state { ARMED, WAIT_IRQ, WAIT_UNMASK };

struct dev {
	uint64_t fired_at; /* ns, CLOCK_MONOTONIC */
	uint64_t eoi_at, routed_at; /* the last EOI sent, the last route applied */
	uint8_t state;
	uint8_t fired_kernel, eoi_kernel; /* fire, EOI made with a virqfd bound */
	uint8_t routed_kernel; /* the last route bound a virqfd */
};

/* Log-linear latency histogram (HdrHistogram-style): values below 256 ns
 * exact, above that 128 buckets per power of two, so a percentile is within
 * 0.4% whatever the run length, in fixed memory. */
#define SUB_BITS 7
#define SUB (1u << SUB_BITS)
#define NBUCKETS (SUB * (64 - SUB_BITS + 1))

struct hist {
	uint64_t buckets[NBUCKETS];
	uint64_t count, max;
	double sum;
};

static unsigned hist_index(uint64_t v)
{
	unsigned shift;

	if (v < 2 * SUB)
		return (unsigned)v;
	shift = (unsigned)(63 - __builtin_clzll(v)) - SUB_BITS;
	return SUB * (shift + 1) + (unsigned)((v >> shift) - SUB);
}

/* Middle of the bucket's value range. */
static uint64_t hist_value(unsigned idx)
{
	unsigned shift;

	if (idx < 2 * SUB)
		return idx;
	shift = idx / SUB - 1;
	return ((uint64_t)(idx % SUB + SUB) << shift) + ((1ull << shift) - 1) / 2;
}

static void hist_add(struct hist *h, uint64_t v)
{
	h->buckets[hist_index(v)]++;
	h->count++;
	h->sum += (double)v;
	if (v > h->max)
		h->max = v;
}

static double hist_quantile_us(const struct hist *h, double q)
{
	uint64_t rank, seen = 0;

	if (!h->count)
		return 0;
	rank = (uint64_t)(q * (double)h->count + 0.999999);
	if (rank < 1)
		rank = 1;
	for (unsigned i = 0; i < NBUCKETS; i++) {
		seen += h->buckets[i];
		if (seen >= rank)
			return (double)hist_value(i) / 1e3;
	}
	return (double)h->max / 1e3;
}

struct pump {
	struct quad *q;
	struct dev *dev;
	size_t n;
	uint64_t fired, irq_received, eoi_sent, unmask_received;
	uint64_t skipped, unexpected, errors, in_flight;
	uint64_t completed, refires, stray_unmasks, redelivered;
	uint64_t virqfd_unmasks, kernel_fired, routes;
	uint64_t *kernel_fires; /* shared with the stand-in (--kernel-fires), or NULL */
	int level, ep;
	struct hist lat;
};

static uint64_t drain(struct pump *p, int fd)
{
	uint64_t v;

	if (read(fd, &v, sizeof(v)) == (ssize_t)sizeof(v))
		return v;
	if (errno != EAGAIN) /* EAGAIN: spurious wakeup, harmless */
		p->errors++;
	return 0;
}

static int signal_one(struct pump *p, int fd)
{
	static const uint64_t one = 1;

	if (write(fd, &one, sizeof(one)) == (ssize_t)sizeof(one))
		return 1;
	p->errors++;
	return 0;
}

/* The device's line signals its trigger: eoid's eventfd on the relay, the
 * consumer's irq on the kernel's path (counted as the host would). */
static int signal_trigger(struct pump *p, size_t i)
{
	if (!signal_one(p, p->q[i].trigger))
		return 0;
	if (p->q[i].virqfd >= 0) {
		p->kernel_fired++;
		if (p->kernel_fires)
			__atomic_add_fetch(&p->kernel_fires[i], 1, __ATOMIC_RELAXED);
	}
	return 1;
}

static void fire(struct pump *p, size_t i)
{
	/* Stamp before the write: the latency includes the fire itself. */
	p->dev[i].fired_at = now_ns();
	if (!signal_trigger(p, i))
		return;
	p->dev[i].state = WAIT_IRQ;
	p->dev[i].fired_kernel = p->q[i].virqfd >= 0;
	p->fired++;
	p->in_flight++;
}

/* The guest: take the interrupt, acknowledge it at once. */
static void on_irq(struct pump *p, size_t i)
{
	uint64_t v = drain(p, p->q[i].irq);

	if (!v)
		return;
	p->irq_received += v;
	if (p->level && p->dev[i].state == WAIT_UNMASK) {
		/* Already ended: delivered again to a re-attached consumer. */
		p->redelivered += v;
		if (signal_one(p, p->q[i].eoi))
			p->eoi_sent++;
		return;
	}
	if (p->dev[i].state != WAIT_IRQ) {
		/* Delivered twice, or without a fire: the relay is wrong. */
		p->unexpected++;
		return;
	}
	if (signal_one(p, p->q[i].eoi)) {
		p->eoi_sent++;
		p->dev[i].state = WAIT_UNMASK;
		p->dev[i].eoi_at = now_ns();
		p->dev[i].eoi_kernel = p->q[i].virqfd >= 0;
	}
}

/* The device: the line is re-armed, by eoid's unmask eventfd or (virqfd) by the
 * kernel's path on the consumer's EOI. Returns 1 if this completed a round trip. */
static int on_unmask(struct pump *p, size_t i, int virqfd)
{
	uint64_t v;

	if (virqfd && p->q[i].virqfd < 0)
		return 0; /* unbound by a route earlier in the same batch of events */
	v = drain(p, virqfd ? p->q[i].virqfd : p->q[i].unmask);
	if (!v)
		return 0;
	p->unmask_received += v;
	if (virqfd)
		p->virqfd_unmasks += v;
	if (p->level && p->dev[i].state == ARMED) {
		p->stray_unmasks += v; /* an unmasked line: no-op */
		return 0;
	}
	if (p->level && p->dev[i].state == WAIT_IRQ) {
		/* Still asserted, not yet serviced: the line fires again. */
		if (signal_trigger(p, i))
			p->refires++;
		return 0;
	}
	if (p->dev[i].state != WAIT_UNMASK) {
		p->unexpected++;
		return 0;
	}
	p->completed++;
	hist_add(&p->lat, now_ns() - p->dev[i].fired_at);
	p->dev[i].state = ARMED;
	p->in_flight--;
	return 1;
}

static void unbind(struct pump *p, size_t i)
{
	if (p->q[i].virqfd < 0)
		return;
	/* DEL first: epoll forgets an fd only once every copy of its file is closed,
	 * and the consumer's eoi (q[i].eoi) is another copy. */
	if (epoll_ctl(p->ep, EPOLL_CTL_DEL, p->q[i].virqfd, NULL) < 0)
		die("epoll_ctl(DEL, %d):", p->q[i].virqfd);
	close(p->q[i].virqfd);
	p->q[i].virqfd = -1;
}

static void swap_trigger(struct pump *p, size_t i, int trigger)
{
	close(p->q[i].trigger);
	p->q[i].trigger = trigger;
}

/* One route from the stand-in (see --routes): applied in the kernel's order,
 * then acknowledged. Returns 1 if it completed a round trip (a count already
 * in a newly bound virqfd), 0 if not, -1 when the stand-in has closed. */
static int on_route(struct pump *p, int sock, size_t *dev)
{
	uint32_t index;
	union {
		char buf[CMSG_SPACE(2 * sizeof(int))];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = { .iov_base = &index, .iov_len = sizeof(index) };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
			      .msg_controllen = sizeof(ctl.buf) };
	int fds[2] = { -1, -1 }, nfds = 0, done = 0;
	ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	if (n <= 0)
		return -1;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
			nfds = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			memcpy(fds, CMSG_DATA(c), (size_t)nfds * sizeof(int));
		}
	if (n != sizeof(index) || index >= p->n || nfds < 1 || nfds > 2 ||
	    (msg.msg_flags & MSG_CTRUNC))
		die("--routes: bad route message (%zd bytes, %d fds)", n, nfds);
	*dev = index;
	for (int k = 0; k < nfds; k++)
		check_fd_nonblock(fds[k]);
	if (nfds == 2) { /* bind the virqfd, then swap the trigger */
		unbind(p, index);
		p->q[index].virqfd = fds[1];
		epoll_add(p->ep, fds[1], (uint64_t)index << 3 | K_VIRQFD);
		swap_trigger(p, index, fds[0]);
		done = on_unmask(p, index, 1);
	} else { /* swap the trigger, then unbind */
		swap_trigger(p, index, fds[0]);
		unbind(p, index);
	}
	p->routes++;
	p->dev[index].routed_at = now_ns();
	p->dev[index].routed_kernel = nfds == 2;
	if (send(sock, &index, sizeof(index), MSG_NOSIGNAL) != (ssize_t)sizeof(index))
		p->errors++;
	return done;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: %s (--fds LIST | --fds-from FD) --mode closed|paced [--rate R]\n"
		"            [--duration S] [--drain S] [--spin-us N] [--level]\n"
		"            [--routes FD] [--kernel-fires FD]\n",
		progname);
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "fds", required_argument, NULL, 'f' },
		{ "fds-from", required_argument, NULL, 'F' },
		{ "mode", required_argument, NULL, 'm' },
		{ "rate", required_argument, NULL, 'r' },
		{ "duration", required_argument, NULL, 'd' },
		{ "drain", required_argument, NULL, 'D' },
		{ "spin-us", required_argument, NULL, 's' },
		{ "level", no_argument, NULL, 'l' },
		{ "routes", required_argument, NULL, 'R' },
		{ "kernel-fires", required_argument, NULL, 'K' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fds = NULL, *fds_from = NULL, *mode = NULL;
	double duration = 3, drain_s = 1;
	uint64_t rate = 0, spin_ns = 0;
	int paced, ep, sfd, c, running = 1, routes = -1, kfd = -1;
	struct epoll_event evs[MAX_EVENTS];
	static struct pump p; /* static: the histogram is ~60 KiB */

	progname = "pump";
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'f': fds = optarg; break;
		case 'F': fds_from = optarg; break;
		case 'm': mode = optarg; break;
		case 'r': rate = (uint64_t)parse_long("--rate", optarg, 1, 1000000000); break;
		case 'd': duration = parse_seconds("--duration", optarg); break;
		case 'D': drain_s = parse_seconds("--drain", optarg); break;
		case 'l': p.level = 1; break;
		case 'R': routes = (int)parse_long("--routes", optarg, 0, INT32_MAX); break;
		case 'K': kfd = (int)parse_long("--kernel-fires", optarg, 0, INT32_MAX); break;
		case 's': spin_ns = 1000 * (uint64_t)parse_long("--spin-us", optarg, 0, 1000000000); break;
		default: usage();
		}
	}
	if (optind != argc || !mode)
		usage();
	if (!strcmp(mode, "closed"))
		paced = 0;
	else if (!strcmp(mode, "paced"))
		paced = 1;
	else
		die("--mode: expected closed or paced, got '%s'", mode);
	if (paced != (rate != 0))
		die("--rate is required with --mode paced and only allowed with it");

	p.q = load_quads(fds, fds_from, &p.n);
	p.dev = calloc(p.n, sizeof(*p.dev));
	if (!p.dev)
		die("out of memory");
	if (kfd >= 0) {
		p.kernel_fires = mmap(NULL, p.n * sizeof(uint64_t), PROT_READ | PROT_WRITE,
				      MAP_SHARED, kfd, 0);
		if (p.kernel_fires == MAP_FAILED)
			die("--kernel-fires %d: mmap:", kfd);
	}
	ep = p.ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1:");
	for (size_t i = 0; i < p.n; i++) {
		epoll_add(ep, p.q[i].irq, (uint64_t)i << 3 | K_IRQ);
		epoll_add(ep, p.q[i].unmask, (uint64_t)i << 3 | K_UNMASK);
		if (p.q[i].virqfd >= 0)
			epoll_add(ep, p.q[i].virqfd, (uint64_t)i << 3 | K_VIRQFD);
	}
	sfd = stop_signalfd();
	epoll_add(ep, sfd, K_SIGNAL);
	if (routes >= 0)
		epoll_add(ep, routes, K_ROUTES);
	/* The default 50 us timer slack would bunch paced fires into bursts at
	 * 100k/s (a 10 us period); ask for wakeups as exact as the kernel can. */
	prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);

	struct cpu_sample cpu0 = cpu_sample();
	const uint64_t start = now_ns();
	const uint64_t end = start + (uint64_t)(duration * 1e9);
	uint64_t stopped = 0, drain_end = 0, slot = 0, next_due = start;

	if (!paced)
		for (size_t i = 0; i < p.n; i++)
			fire(&p, i);

	for (;;) {
		uint64_t now = now_ns(), deadline;

		if (running && now >= end)
			running = 0;
		if (!running && !stopped) {
			stopped = now;
			drain_end = now + (uint64_t)(drain_s * 1e9);
		}
		if (running && paced) {
			/* Catch up on every slot that is due, so the average rate
			 * holds even when a wakeup comes late. */
			while (next_due <= now) {
				size_t i = (size_t)(slot % p.n);

				if (p.dev[i].state == ARMED)
					fire(&p, i);
				else
					p.skipped++;
				slot++;
				next_due = start + slot * 1000000000ull / rate;
			}
		}
		if (!running && (!p.in_flight || now >= drain_end))
			break;

		deadline = !running ? drain_end : paced && next_due < end ? next_due : end;
		uint64_t wait = deadline > now ? deadline - now : 0;
		/* A sleep costs a wakeup (tens of us of CPU in a VM, and a
		 * cross-CPU wakeup charged to the relay's write): see --spin-us. */
		if (wait <= spin_ns)
			wait = 0;
		struct timespec ts = { .tv_sec = (time_t)(wait / 1000000000u),
				       .tv_nsec = (long)(wait % 1000000000u) };
		int ne = epoll_pwait2(ep, evs, MAX_EVENTS, &ts, NULL);

		if (ne < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_pwait2:");
		}
		for (int e = 0; e < ne; e++) {
			uint64_t cookie = evs[e].data.u64;
			size_t i = (size_t)(cookie >> 3);

			switch (cookie & 7) {
			case K_IRQ:
				on_irq(&p, i);
				break;
			case K_UNMASK:
			case K_VIRQFD:
				if (on_unmask(&p, i, (cookie & 7) == K_VIRQFD) && running && !paced)
					fire(&p, i);
				break;
			case K_ROUTES: {
				int r = on_route(&p, routes, &i);

				if (r < 0) { /* the stand-in is gone: no more routes */
					epoll_ctl(ep, EPOLL_CTL_DEL, routes, NULL);
					close(routes);
					routes = -1;
				} else if (r && running && !paced) {
					fire(&p, i);
				}
				break;
			}
			case K_SIGNAL: {
				struct signalfd_siginfo si;

				if (read(sfd, &si, sizeof(si)) == (ssize_t)sizeof(si))
					running = 0;
				break;
			}
			}
		}
	}

	struct cpu_sample cpu1 = cpu_sample();
	const double window = (double)(stopped - start) / 1e9;
	const int equal = p.fired == p.irq_received && p.irq_received == p.eoi_sent &&
			  p.eoi_sent == p.unmask_received;
	const int ok = (p.level ? p.completed == p.fired && !p.in_flight : equal) &&
		       !p.unexpected && !p.errors;
	const uint64_t done = p.level ? p.completed : p.unmask_received;

	printf("{\"prog\": \"pump\", \"mode\": \"%s\", \"devices\": %zu, \"rate\": ", mode, p.n);
	if (paced)
		printf("%" PRIu64, rate);
	else
		printf("null");
	printf(", \"duration\": %.6f, \"drain_s\": %.6f, "
	       "\"fired\": %" PRIu64 ", \"irq_received\": %" PRIu64 ", \"eoi_sent\": %" PRIu64 ", "
	       "\"unmask_received\": %" PRIu64 ", \"skipped\": %" PRIu64 ", \"unexpected\": %" PRIu64 ", "
	       "\"errors\": %" PRIu64 ", \"in_flight\": %" PRIu64 ", \"lost\": %" PRIu64 ", "
	       "\"completed\": %" PRIu64 ", \"refires\": %" PRIu64 ", \"stray_unmasks\": %" PRIu64 ", "
	       "\"redelivered\": %" PRIu64 ", \"virqfd_unmasks\": %" PRIu64 ", "
	       "\"kernel_fired\": %" PRIu64 ", \"routes\": %" PRIu64 ", \"rate_achieved\": %.1f, "
	       "\"p50_us\": %.2f, \"p99_us\": %.2f, \"p999_us\": %.2f, \"max_us\": %.2f, "
	       "\"mean_us\": %.2f, \"cpu_us\": %.0f, \"ok\": %s}\n",
	       window, (double)(now_ns() - stopped) / 1e9, p.fired, p.irq_received, p.eoi_sent,
	       p.unmask_received, p.skipped, p.unexpected, p.errors, p.in_flight,
	       p.fired > done ? p.fired - done : 0, p.completed, p.refires, p.stray_unmasks,
	       p.redelivered, p.virqfd_unmasks, p.kernel_fired, p.routes,
	       window > 0 ? (double)p.unmask_received / window : 0.0,
	       hist_quantile_us(&p.lat, 0.50), hist_quantile_us(&p.lat, 0.99),
	       hist_quantile_us(&p.lat, 0.999), (double)p.lat.max / 1e3,
	       p.lat.count ? p.lat.sum / (double)p.lat.count / 1e3 : 0.0,
	       cpu1.user_us + cpu1.sys_us - cpu0.user_us - cpu0.sys_us, ok ? "true" : "false");
	if (!ok)
		fprintf(stderr, "pump: lost: fired %" PRIu64 ", irq %" PRIu64 ", eoi %" PRIu64
				", unmask %" PRIu64 ", unexpected %" PRIu64 ", errors %" PRIu64 "\n",
			p.fired, p.irq_received, p.eoi_sent, p.unmask_received, p.unexpected,
			p.errors);
	/* What each line still in flight went through last (at most 20): when a route
	 * strands a line, the order of fire, EOI and route says how. */
	for (size_t i = 0, shown = 0; i < p.n && shown < 20 && p.in_flight; i++) {
		const struct dev *d = &p.dev[i];

		if (d->state == ARMED)
			continue;
		shown++;
		fprintf(stderr, "pump: in flight: device %zu %s, fired on the %s path, "
				"EOI %s%s; last route (to the %s path) %+.1f us after the fire%s\n",
			i, d->state == WAIT_IRQ ? "waits for its irq" : "waits for its unmask",
			d->fired_kernel ? "kernel's" : "relay's",
			d->state == WAIT_UNMASK ? "sent with the virqfd " : "not sent",
			d->state == WAIT_UNMASK ? (d->eoi_kernel ? "bound" : "unbound") : "",
			d->routed_kernel ? "kernel's" : "relay's",
			((double)d->routed_at - (double)d->fired_at) / 1e3,
			d->state == WAIT_UNMASK && d->routed_at > d->eoi_at ? " (and after the EOI)"
									    : "");
	}
	return ok ? 0 : 1;
}

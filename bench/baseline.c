/* baseline: the cheapest userspace INTx relay, to measure eoid against.
 *
 * A single-threaded, level-triggered epoll loop doing exactly eoid's
 * per-interrupt syscalls for N devices and nothing else:
 *     trigger readable: read(trigger) -> write(irq, 1)    (forward)
 *     eoi readable:     read(eoi)     -> write(unmask, 1) (re-arm the line)
 * so its CPU time per interrupt is the floor for any daemon built on the
 * same eventfd contract.
 *
 * Usage:
 *     baseline (--fds LIST | --fds-from FD) [--ready-fd FD]
 * LIST is "trigger,irq,eoi,unmask;..." of inherited fds, one quad per device
 * (see common.h; --fds-from reads the same list from an inherited file or
 * memfd). --ready-fd: write one byte to FD and close it once every fd is
 * registered, so a driver can start the load only then.
 *
 * Stops on SIGTERM/SIGINT or when stdin reaches EOF (a driver just closes
 * the pipe; stdin that cannot be polled, e.g. /dev/null, is ignored), then
 * prints one JSON line to stdout: counters and the CPU time spent in the
 * loop (getrusage, setup excluded so that short paced runs with thousands
 * of devices are not skewed by registering them).
 */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <unistd.h>

/* epoll cookie: device index << 2 | kind */
enum { K_TRIGGER, K_EOI, K_STDIN, K_SIGNAL };
#define MAX_EVENTS 256

struct stats {
	uint64_t trigger_reads, triggers; /* triggers: sum of counts read */
	uint64_t irq_writes;
	uint64_t eoi_reads, eois;
	uint64_t unmask_writes;
	uint64_t wakeups, events, errors;
};

/* Drain one eventfd; returns its count, 0 if it was already empty. */
static uint64_t drain(int fd, struct stats *st)
{
	uint64_t v;

	if (read(fd, &v, sizeof(v)) == (ssize_t)sizeof(v))
		return v;
	/* EAGAIN is a spurious wakeup, harmless; anything else is a bug. */
	if (errno != EAGAIN)
		st->errors++;
	return 0;
}

static int signal_one(int fd, struct stats *st)
{
	static const uint64_t one = 1;

	if (write(fd, &one, sizeof(one)) == (ssize_t)sizeof(one))
		return 1;
	st->errors++;
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: %s (--fds LIST | --fds-from FD) [--ready-fd FD]\n", progname);
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "fds", required_argument, NULL, 'f' },
		{ "fds-from", required_argument, NULL, 'F' },
		{ "ready-fd", required_argument, NULL, 'r' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fds = NULL, *fds_from = NULL;
	int ready_fd = -1, ep, sfd, c;
	struct epoll_event evs[MAX_EVENTS];
	struct stats st = { 0 };
	struct quad *q;
	size_t n;
	const char *stop = NULL;

	progname = "baseline";
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'f': fds = optarg; break;
		case 'F': fds_from = optarg; break;
		case 'r': ready_fd = (int)parse_long("--ready-fd", optarg, 0, INT32_MAX); break;
		default: usage();
		}
	}
	if (optind != argc)
		usage();
	q = load_quads(fds, fds_from, &n);

	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1:");
	for (size_t i = 0; i < n; i++) {
		epoll_add(ep, q[i].trigger, (uint64_t)i << 2 | K_TRIGGER);
		epoll_add(ep, q[i].eoi, (uint64_t)i << 2 | K_EOI);
	}
	sfd = stop_signalfd();
	epoll_add(ep, sfd, K_SIGNAL);
	{
		struct epoll_event ev = { .events = EPOLLIN, .data.u64 = K_STDIN };

		if (epoll_ctl(ep, EPOLL_CTL_ADD, STDIN_FILENO, &ev) < 0 && errno != EPERM && errno != EBADF)
			die("epoll_ctl(stdin):");
	}
	if (ready_fd >= 0) {
		if (write(ready_fd, "R", 1) != 1)
			die("--ready-fd %d: write:", ready_fd);
		close(ready_fd);
	}

	struct cpu_sample cpu0 = cpu_sample();
	uint64_t t0 = now_ns();

	while (!stop) {
		int ne = epoll_wait(ep, evs, MAX_EVENTS, -1);

		if (ne < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_wait:");
		}
		st.wakeups++;
		st.events += (uint64_t)ne;
		for (int e = 0; e < ne; e++) {
			uint64_t cookie = evs[e].data.u64, v;
			const struct quad *d = &q[cookie >> 2];

			switch (cookie & 3) {
			case K_TRIGGER:
				/* A count > 1 would be coalesced edges: forward once, as eoid does. */
				if ((v = drain(d->trigger, &st))) {
					st.trigger_reads++;
					st.triggers += v;
					st.irq_writes += (uint64_t)signal_one(d->irq, &st);
				}
				break;
			case K_EOI:
				if ((v = drain(d->eoi, &st))) {
					st.eoi_reads++;
					st.eois += v;
					st.unmask_writes += (uint64_t)signal_one(d->unmask, &st);
				}
				break;
			case K_STDIN: {
				char buf[256];
				ssize_t r = read(STDIN_FILENO, buf, sizeof(buf));

				if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
					stop = "stdin";
				break;
			}
			case K_SIGNAL: {
				struct signalfd_siginfo si;

				if (read(sfd, &si, sizeof(si)) == (ssize_t)sizeof(si))
					stop = "signal";
				break;
			}
			}
		}
	}

	struct cpu_sample cpu1 = cpu_sample();
	double user = cpu1.user_us - cpu0.user_us, sys = cpu1.sys_us - cpu0.sys_us;

	printf("{\"prog\": \"baseline\", \"devices\": %zu, \"stop\": \"%s\", "
	       "\"triggers\": %" PRIu64 ", \"trigger_reads\": %" PRIu64 ", \"irq_writes\": %" PRIu64 ", "
	       "\"eois\": %" PRIu64 ", \"eoi_reads\": %" PRIu64 ", \"unmask_writes\": %" PRIu64 ", "
	       "\"wakeups\": %" PRIu64 ", \"events\": %" PRIu64 ", \"errors\": %" PRIu64 ", "
	       "\"wall_s\": %.6f, \"cpu_us\": %.0f, \"user_us\": %.0f, \"sys_us\": %.0f, "
	       "\"setup_cpu_us\": %.0f, \"voluntary_ctxsw\": %ld, \"involuntary_ctxsw\": %ld}\n",
	       n, stop, st.triggers, st.trigger_reads, st.irq_writes, st.eois, st.eoi_reads,
	       st.unmask_writes, st.wakeups, st.events, st.errors, (double)(now_ns() - t0) / 1e9,
	       user + sys, user, sys, cpu0.user_us + cpu0.sys_us,
	       cpu1.voluntary_ctxsw - cpu0.voluntary_ctxsw,
	       cpu1.involuntary_ctxsw - cpu0.involuntary_ctxsw);
	return st.errors ? 1 : 0;
}

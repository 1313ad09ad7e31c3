/* Shared helpers for baseline.c and pump.c; see common.h. */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <unistd.h>

const char *progname = "bench";

void die(const char *fmt, ...)
{
	int saved = errno;
	va_list ap;

	fprintf(stderr, "%s: ", progname);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	/* A trailing ':' asks for the errno text, like perror. */
	if (fmt[0] && fmt[strlen(fmt) - 1] == ':')
		fprintf(stderr, " %s", strerror(saved));
	fputc('\n', stderr);
	exit(2);
}

long parse_long(const char *opt, const char *value, long min, long max)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(value, &end, 10);
	if (errno || end == value || *end || v < min || v > max)
		die("%s: expected an integer in [%ld, %ld], got '%s'", opt, min, max, value);
	return v;
}

double parse_seconds(const char *opt, const char *value)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(value, &end);
	if (errno || end == value || *end || !isfinite(v) || v < 0)
		die("%s: expected seconds >= 0, got '%s'", opt, value);
	return v;
}

/* Read the whole list from an inherited fd. pread, not read: the parent may
 * hand the same memfd to two children, which share its file offset. */
static char *read_spec_fd(int fd)
{
	size_t cap = 1 << 16, len = 0;
	char *buf = malloc(cap);

	if (!buf)
		die("out of memory");
	for (;;) {
		ssize_t n = pread(fd, buf + len, cap - len - 1, (off_t)len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("--fds-from %d: read:", fd);
		}
		if (n == 0)
			break;
		len += (size_t)n;
		if (cap - len == 1) {
			cap *= 2;
			buf = realloc(buf, cap);
			if (!buf)
				die("out of memory");
		}
	}
	buf[len] = '\0';
	return buf;
}

int check_fd_nonblock(long fd)
{
	int flags = fcntl((int)fd, F_GETFL);

	if (flags < 0)
		die("fd %ld is not open:", fd);
	/* The fd's file description is shared with whoever created it; only
	 * touch the flags when nonblocking isn't set already. */
	if (!(flags & O_NONBLOCK) && fcntl((int)fd, F_SETFL, flags | O_NONBLOCK) < 0)
		die("fd %ld: set O_NONBLOCK:", fd);
	return (int)fd;
}

static struct quad *parse_spec(const char *spec, size_t *count)
{
	size_t cap = 64, n = 0;
	struct quad *q = malloc(cap * sizeof(*q));
	const char *p = spec;

	if (!q)
		die("out of memory");
	while (*p) {
		long v[5] = { 0, 0, 0, 0, -1 };
		int fields = 4;

		for (int i = 0; i < fields; i++) {
			char *end;

			errno = 0;
			v[i] = strtol(p, &end, 10);
			/* only the optional fifth (virqfd) may be -1: none */
			if (errno || end == p || v[i] < (i == 4 ? -1 : 0) || v[i] > INT32_MAX)
				die("fd list: bad number at '%.20s'", p);
			p = end;
			if (i < 3) {
				if (*p != ',')
					die("fd list: expected ',' at '%.20s' (need trigger,irq,eoi,unmask)", p);
				p++;
			} else if (i == 3 && *p == ',') {
				fields = 5;
				p++;
			}
		}
		if (n == cap) {
			cap *= 2;
			q = realloc(q, cap * sizeof(*q));
			if (!q)
				die("out of memory");
		}
		q[n].trigger = check_fd_nonblock(v[0]);
		q[n].irq = check_fd_nonblock(v[1]);
		q[n].eoi = check_fd_nonblock(v[2]);
		q[n].unmask = check_fd_nonblock(v[3]);
		q[n].virqfd = v[4] < 0 ? -1 : check_fd_nonblock(v[4]);
		n++;
		/* Separators: ';' between quads; tolerate trailing space/newline
		 * from a file. */
		while (*p == ';' || *p == '\n' || *p == ' ')
			p++;
	}
	if (n == 0)
		die("fd list is empty");
	*count = n;
	return q;
}

struct quad *load_quads(const char *inline_spec, const char *from_fd, size_t *count)
{
	struct quad *q;
	char *buf;

	if (!inline_spec == !from_fd)
		die("give exactly one of --fds LIST or --fds-from FD");
	if (inline_spec)
		return parse_spec(inline_spec, count);
	buf = read_spec_fd((int)parse_long("--fds-from", from_fd, 0, INT32_MAX));
	q = parse_spec(buf, count);
	free(buf);
	return q;
}

int stop_signalfd(void)
{
	sigset_t set;
	int fd;

	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	if (sigprocmask(SIG_BLOCK, &set, NULL) < 0)
		die("sigprocmask:");
	fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	if (fd < 0)
		die("signalfd:");
	return fd;
}

struct cpu_sample cpu_sample(void)
{
	struct rusage ru;

	if (getrusage(RUSAGE_SELF, &ru) < 0)
		die("getrusage:");
	return (struct cpu_sample){
		.user_us = (double)ru.ru_utime.tv_sec * 1e6 + (double)ru.ru_utime.tv_usec,
		.sys_us = (double)ru.ru_stime.tv_sec * 1e6 + (double)ru.ru_stime.tv_usec,
		.voluntary_ctxsw = ru.ru_nvcsw,
		.involuntary_ctxsw = ru.ru_nivcsw,
	};
}

void epoll_add(int ep, int fd, uint64_t cookie)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.u64 = cookie };

	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
		die("epoll_ctl(ADD, %d):", fd);
}

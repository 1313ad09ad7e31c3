/* Shared helpers for the C benchmark programs (baseline.c, pump.c).
 *
 * Both programs inherit eventfds from their parent and are told which is
 * which with a device list, one quad per device, in the order
 *     trigger,irq,eoi,unmask
 * and quads separated by ';', e.g. "3,4,5,6;7,8,9,10". The pump also takes
 * an optional fifth fd, ",virqfd" (-1: none): the eventfd the kernel's path
 * reads as the line's unmask (the consumer's eoi eventfd; see pump.c). The
 * list is given
 * either inline (--fds LIST) or, for thousands of devices where it would
 * approach the kernel's 128 KiB limit on one argument, in a file or memfd
 * that the parent passes as an inherited fd (--fds-from FD, read with
 * pread from offset 0 so that two children sharing it don't race on the
 * file offset).
 */
#ifndef EOID_BENCH_COMMON_H
#define EOID_BENCH_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

struct quad {
	int trigger; /* kernel (pump) writes when the device fires; daemon reads */
	int irq;     /* daemon writes to forward; guest (pump) reads */
	int eoi;     /* guest (pump) writes on EOI; daemon reads */
	int unmask;  /* daemon writes to re-arm; simulated device (pump) reads */
	int virqfd;  /* kernel's path: bound unmask eventfd the kernel (pump) reads; -1: none */
};

/* Print "prog: message[: strerror]" and exit 2. */
__attribute__((noreturn, format(printf, 1, 2))) void die(const char *fmt, ...);

/* Parse the quads from --fds (inline) or --fds-from (fd); exactly one of the
 * two must be given. Every fd is checked to be open and made nonblocking. */
struct quad *load_quads(const char *inline_spec, const char *from_fd, size_t *count);

/* Check that fd is open and make it nonblocking; returns it. */
int check_fd_nonblock(long fd);

/* Parse an option's value (integer within [min, max]; seconds >= 0) or die
 * naming the option. */
long parse_long(const char *opt, const char *value, long min, long max);
double parse_seconds(const char *opt, const char *value);

/* Block SIGTERM and SIGINT and return a nonblocking signalfd for them, so the
 * epoll loop sees a stop request as an ordinary event. */
int stop_signalfd(void);

/* CPU this process has used so far (getrusage), and context switches. */
struct cpu_sample {
	double user_us;
	double sys_us;
	long voluntary_ctxsw;
	long involuntary_ctxsw;
};
struct cpu_sample cpu_sample(void);

/* Register fd with epoll for EPOLLIN with the given cookie. */
void epoll_add(int ep, int fd, uint64_t cookie);

/* CLOCK_MONOTONIC in nanoseconds (vDSO: no syscall). */
static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Set by each program's main() for messages. */
extern const char *progname;

#endif

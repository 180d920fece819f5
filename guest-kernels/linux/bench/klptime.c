// SPDX-License-Identifier: Apache-2.0
/*
 * klptime: times Linux's own livepatch from inside the guest, for the
 * lucos-versus-livepatch benchmark (benches/livepatch.rs). Static, no libc
 * beyond what glibc links in statically.
 *
 *   klptime load MODULE.ko NAME   finit_module(), then poll
 *                                 /sys/kernel/livepatch/NAME/transition
 *                                 until it reads 0
 *   klptime unload NAME           write 0 to .../NAME/enabled, poll the
 *                                 transition, then delete_module() until
 *                                 the module is gone
 *   klptime spin MS [FILE TEXT present|absent]
 *                                 spin on CLOCK_MONOTONIC and report the
 *                                 longest gap seen: the longest time this
 *                                 task was kept from running (a guest
 *                                 pause, an IPI storm, a stop_machine, the
 *                                 scheduler); for MS milliseconds, or with
 *                                 FILE, until FILE (read every 10 ms)
 *                                 holds TEXT (or no longer does) and MS
 *                                 milliseconds more: a window that lasts as
 *                                 long as the operation it watches, however
 *                                 slow the machine
 *   klptime pause                 sleep in pause() until killed: a task
 *                                 asleep in a kernel function that nothing
 *                                 but a signal wakes (benches/time_to_effect.rs)
 *
 * Each prints one "@@KLP ..." line of key=value figures in microseconds.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void pause_us(long us)
{
	struct timespec ts = { .tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000 };

	nanosleep(&ts, NULL);
}

/* The first character of a sysfs file, or -1 if it cannot be read. */
static int read_char(const char *path)
{
	char c;
	int fd = open(path, O_RDONLY);
	int n;

	if (fd < 0)
		return -1;
	n = read(fd, &c, 1);
	close(fd);
	return n == 1 ? c : -1;
}

/*
 * Polls NAME's transition file until it reads 0 (or, with gone_ok, until the
 * patch is gone: a disabled patch is freed with its sysfs directory).
 */
static int wait_transition(const char *name, double limit_us, int gone_ok)
{
	char path[256];
	double t0 = now_us();

	snprintf(path, sizeof(path), "/sys/kernel/livepatch/%s/transition", name);
	for (;;) {
		int c = read_char(path);

		if (c == '0' || (c == -1 && gone_ok))
			return 0;
		if (c == -1)
			return -1;
		if (now_us() - t0 > limit_us)
			return -1;
		pause_us(100);
	}
}

static int load(const char *ko, const char *name)
{
	int fd = open(ko, O_RDONLY | O_CLOEXEC);
	double t0, t1, t2;

	if (fd < 0) {
		fprintf(stderr, "klptime: cannot open %s: %s\n", ko, strerror(errno));
		return 1;
	}
	t0 = now_us();
	if (syscall(SYS_finit_module, fd, "", 0) != 0) {
		fprintf(stderr, "klptime: finit_module %s: %s\n", ko, strerror(errno));
		return 1;
	}
	t1 = now_us();
	if (wait_transition(name, 60e6, 0) != 0) {
		fprintf(stderr, "klptime: %s: transition not done after 60 s\n", name);
		return 1;
	}
	t2 = now_us();
	printf("@@KLP load name=%s insmod_us=%.1f total_us=%.1f\n", name, t1 - t0, t2 - t0);
	return 0;
}

static int unload(const char *name)
{
	char path[256];
	double t0, t1, t2;
	int fd;

	snprintf(path, sizeof(path), "/sys/kernel/livepatch/%s/enabled", name);
	fd = open(path, O_WRONLY);
	if (fd < 0) {
		fprintf(stderr, "klptime: cannot open %s: %s\n", path, strerror(errno));
		return 1;
	}
	t0 = now_us();
	if (write(fd, "0", 1) != 1) {
		fprintf(stderr, "klptime: disabling %s: %s\n", name, strerror(errno));
		close(fd);
		return 1;
	}
	close(fd);
	if (wait_transition(name, 60e6, 1) != 0) {
		fprintf(stderr, "klptime: %s: transition not done after 60 s\n", name);
		return 1;
	}
	t1 = now_us();
	/* The patch drops its module reference once it is freed. */
	while (syscall(SYS_delete_module, name, O_NONBLOCK) != 0) {
		if (errno != EBUSY && errno != EAGAIN) {
			fprintf(stderr, "klptime: delete_module %s: %s\n", name, strerror(errno));
			return 1;
		}
		if (now_us() - t0 > 60e6) {
			fprintf(stderr, "klptime: %s still busy after 60 s\n", name);
			return 1;
		}
		pause_us(1000);
	}
	t2 = now_us();
	printf("@@KLP unload name=%s total_us=%.1f rmmod_done_us=%.1f\n", name, t1 - t0, t2 - t0);
	return 0;
}

/* Whether FILE holds TEXT (an unreadable file holds nothing). */
static int holds(const char *file, const char *text)
{
	static char buf[65536];
	int fd = open(file, O_RDONLY);
	ssize_t n, len = 0;

	if (fd < 0)
		return 0;
	while (len < (ssize_t)sizeof(buf) - 1 &&
	       (n = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0)
		len += n;
	close(fd);
	buf[len] = 0;
	return strstr(buf, text) != NULL;
}

static int spin(long ms, const char *file, const char *text, int want)
{
	double t0 = now_us(), last = t0, max = 0, checked = t0, seen = file ? 0 : t0;

	for (;;) {
		double t = now_us();

		if (t - last > max)
			max = t - last;
		last = t;
		if (!seen && t - checked > 10e3) {
			if (holds(file, text) == want)
				seen = t;
			checked = t = last = now_us();
		}
		if (seen && t - seen > ms * 1e3)
			break;
	}
	printf("@@KLP spin ms=%ld waited_us=%.1f max_gap_us=%.1f\n", ms, seen - t0, max);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "load"))
		return load(argv[2], argv[3]);
	if (argc == 3 && !strcmp(argv[1], "unload"))
		return unload(argv[2]);
	if (argc == 3 && !strcmp(argv[1], "spin"))
		return spin(atol(argv[2]), NULL, NULL, 0);
	if (argc == 6 && !strcmp(argv[1], "spin") &&
	    (!strcmp(argv[5], "present") || !strcmp(argv[5], "absent")))
		return spin(atol(argv[2]), argv[3], argv[4], !strcmp(argv[5], "present"));
	if (argc == 2 && !strcmp(argv[1], "pause"))
		for (;;)
			pause();
	fprintf(stderr, "usage: klptime load MODULE.ko NAME | unload NAME | "
		"spin MS [FILE TEXT present|absent] | pause\n");
	return 2;
}

// SPDX-License-Identifier: Apache-2.0
/*
 * User tasks (CPL3). Linked at 0x400000 and mapped with 4 KiB user pages.
 * This file must not call kernel code: everything goes through syscall.
 */
#include "tk.h"

enum { P_ITERS, P_REPORT, P_MODE, P_SPIN, P_WORK };
enum { MODE_LOOP, MODE_SPIN, MODE_USER, MODE_TRIPLE };

/* Progress of each task, in user memory; the VMM's tests read it. */
volatile u64 user_progress[MAX_TASKS];
/* Set by the kernel before the first task starts: 1 = enter services with
 * int3 instead of syscall (see BOOT_FLAG_NO_SYSCALL). */
volatile u64 user_service_trap;

static inline u64 sys3(u64 nr, u64 a0, u64 a1, u64 a2)
{
	u64 ret;

	if (user_service_trap) {
		__asm__ volatile("int3"
				 : "=a"(ret)
				 : "a"(nr), "D"(a0), "S"(a1), "d"(a2)
				 : "memory");
		return ret;
	}
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a0), "S"(a1), "d"(a2)
			 : "rcx", "r11", "r8", "r9", "r10", "memory");
	return ret;
}

static unsigned put_dec(char *buf, u64 v)
{
	char tmp[24];
	unsigned n = 0, i = 0;

	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		buf[i++] = tmp[--n];
	return i;
}

static unsigned put_str(char *buf, const char *s)
{
	unsigned i = 0;

	while (s[i]) {
		buf[i] = s[i];
		i++;
	}
	return i;
}

static void report(u64 task, u64 iter, u64 counter)
{
	char ver[64], line[160];
	unsigned n = 0;

	sys3(SYS_VERSION, (u64)ver, sizeof(ver), 0);
	n += put_str(line + n, "[tk] task ");
	n += put_dec(line + n, task);
	n += put_str(line + n, " cpu ");
	n += put_dec(line + n, sys3(SYS_CPU, 0, 0, 0));
	n += put_str(line + n, " iter ");
	n += put_dec(line + n, iter);
	n += put_str(line + n, " counter ");
	n += put_dec(line + n, counter);
	n += put_str(line + n, " version ");
	n += put_str(line + n, ver);
	line[n++] = '\n';
	sys3(SYS_WRITE, (u64)line, n, 0);
}

/*
 * mode=triple: call the 3-function chain (SYS_TRIPLE) every iteration and
 * report at once any call whose three marks differ (old and new code mixed
 * in one call), and every `every` iterations the last marks and mix count.
 */
static void triple(u64 task, u64 iter, u64 every, u64 spin, u64 *mixed)
{
	char marks[4], line[96];
	unsigned n = 0;
	int mix;

	sys3(SYS_TRIPLE, (u64)marks, spin, 0);
	mix = marks[0] != marks[1] || marks[1] != marks[2];
	if (mix)
		(*mixed)++;
	if (!mix && !(every && iter % every == 0))
		return;
	n += put_str(line + n, "[tk] task ");
	n += put_dec(line + n, task);
	n += put_str(line + n, mix ? " MIXED " : " triple ");
	marks[3] = 0;
	n += put_str(line + n, marks);
	n += put_str(line + n, " mixed ");
	n += put_dec(line + n, *mixed);
	line[n++] = '\n';
	sys3(SYS_WRITE, (u64)line, n, 0);
}

__attribute__((noreturn)) void user_main(u64 task)
{
	u64 iters = sys3(SYS_PARAM, P_ITERS, 0, 0), every = sys3(SYS_PARAM, P_REPORT, 0, 0);
	u64 mode = sys3(SYS_PARAM, P_MODE, 0, 0), spin = sys3(SYS_PARAM, P_SPIN, 0, 0);
	u64 work = sys3(SYS_PARAM, P_WORK, 0, 0);
	u64 i, counter = 0, mixed = 0;
	volatile u64 sink = 0;

	for (i = 1; iters == 0 || i <= iters; i++) {
		u64 j;

		if (mode != MODE_USER || (every && i % every == 0)) {
			counter = sys3(SYS_COUNTER, 0, 0, 0);
			sys3(SYS_STATS, task, i, 0);
		}
		if (mode == MODE_SPIN)
			sys3(SYS_SPIN_CLI, spin, 0, 0);
		if (mode == MODE_TRIPLE)
			triple(task, i, every, spin, &mixed);
		/* Plain user-mode work between calls. */
		for (j = 0; j < work; j++)
			sink += j ^ i;
		user_progress[task] = i;
		if (every && i % every == 0)
			report(task, i, counter);
	}
	sys3(SYS_EXIT, 0, 0, 0);
	for (;;)
		;
}

// SPDX-License-Identifier: Apache-2.0
/*
 * User tasks (CPL3). Linked at 0x400000 and mapped with 4 KiB user pages.
 * This file must not call kernel code: everything goes through syscall.
 */
#include "tk.h"

enum { P_ITERS, P_REPORT, P_MODE, P_SPIN, P_WORK };
enum { MODE_LOOP, MODE_SPIN, MODE_USER };

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

__attribute__((noreturn)) void user_main(u64 task)
{
	sys3(99,0,0,0);
	u64 iters = sys3(8, P_ITERS, 0, 0), every = sys3(8, P_REPORT, 0, 0);
	u64 mode = sys3(8, P_MODE, 0, 0), spin = sys3(8, P_SPIN, 0, 0);
	u64 work = sys3(8, P_WORK, 0, 0);
	u64 i, counter = 0;
	volatile u64 sink = 0;

	for (i = 1; iters == 0 || i <= iters; i++) {
		u64 j;

		if (mode != MODE_USER || (every && i % every == 0)) {
			counter = sys3(SYS_COUNTER, 0, 0, 0);
			sys3(SYS_STATS, task, i, 0);
		}
		if (mode == MODE_SPIN)
			sys3(SYS_SPIN_CLI, spin, 0, 0);
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

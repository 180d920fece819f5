// SPDX-License-Identifier: Apache-2.0
/*
 * User tasks (CPL3). Linked at 0x400000 and mapped with 4 KiB user pages.
 * This file must not call kernel code: everything goes through syscall.
 */
#include "tk.h"

enum { P_ITERS, P_REPORT, P_MODE, P_SPIN, P_WORK, P_ATOMIC_N, P_TASKS };
enum { MODE_LOOP, MODE_SPIN, MODE_USER, MODE_TRIPLE, MODE_POKE, MODE_ATOMIC, MODE_WBENCH, MODE_OPS, MODE_STALL, MODE_CTL };

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

/* Updates of the stats table whose result was not the task's own count. */
static u64 stats_lost[MAX_TASKS];

static void report(u64 task, u64 iter, u64 counter)
{
	char ver[64], line[256];
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
	/* The table as unpatched kernel code reads it: exact, and never an
	 * update lost, whatever layout the patched code uses. */
	n += put_str(line + n, " stats calls=");
	n += put_dec(line + n, sys3(SYS_STAT_READ, task, 0, 0));
	n += put_str(line + n, " sum=");
	n += put_dec(line + n, sys3(SYS_STAT_READ, task, 1, 0));
	n += put_str(line + n, " last=");
	n += put_dec(line + n, sys3(SYS_STAT_READ, task, 4, 0));
	n += put_str(line + n, " lost=");
	n += put_dec(line + n, stats_lost[task]);
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

/*
 * mode=poke: each iteration the kernel tries to put lucos_version's first
 * bytes back as built (undoing a live patch) and writes a value elsewhere
 * on the same text page, which must read back; every `every` iterations a
 * report line (with the version the service gives now).
 */
static void poke(u64 task, u64 iter, u64 every)
{
	char line[96];
	unsigned n = 0;
	u64 got;

	sys3(SYS_POKE, 0, 0, 0);
	got = sys3(SYS_POKE, 1 + task, iter * 0x100 + task, 0);
	if (got != iter * 0x100 + task) {
		n += put_str(line + n, "[tk] task ");
		n += put_dec(line + n, task);
		n += put_str(line + n, " poke MISMATCH wrote ");
		n += put_dec(line + n, iter * 0x100 + task);
		n += put_str(line + n, " read ");
		n += put_dec(line + n, got);
		line[n++] = '\n';
		sys3(SYS_WRITE, (u64)line, n, 0);
	}
	if (every && iter % every == 0)
		report(task, iter, 0);
}

/*
 * mode=atomic: a page of user memory whose first 64 bytes the VMM may
 * protect (lucos protect), and a counter on the rest of it. In rounds, every
 * task adds 1 to the counter atomic_n times with `lock incq`; when all have
 * arrived, task 0 checks the count is exact and says so.
 */
struct atomic_page {
	volatile u64 guard[8];
	volatile u64 count;
} __attribute__((aligned(4096)));
struct atomic_page atomic_page;
static volatile u64 atomic_arrived, atomic_checked __attribute__((aligned(64)));

static void atomic_rounds(u64 task, u64 tasks, u64 n)
{
	u64 r, j;

	for (r = 1;; r++) {
		for (j = 0; j < n; j++)
			__asm__ volatile("lock incq %0" : "+m"(atomic_page.count) : : "memory");
		__atomic_add_fetch(&atomic_arrived, 1, __ATOMIC_SEQ_CST);
		while (__atomic_load_n(&atomic_arrived, __ATOMIC_ACQUIRE) < tasks * r)
			__asm__ volatile("pause");
		if (task == 0) {
			char line[128];
			unsigned k = 0;
			u64 got = atomic_page.count, want = tasks * n * r;

			k += put_str(line + k, "[tk] atomic round ");
			k += put_dec(line + k, r);
			k += put_str(line + k, got == want ? " exact count " : " LOST count ");
			k += put_dec(line + k, got);
			k += put_str(line + k, " want ");
			k += put_dec(line + k, want);
			line[k++] = '\n';
			sys3(SYS_WRITE, (u64)line, k, 0);
			__atomic_store_n(&atomic_checked, r, __ATOMIC_RELEASE);
		}
		while (__atomic_load_n(&atomic_checked, __ATOMIC_ACQUIRE) < r)
			__asm__ volatile("pause");
	}
}

/*
 * mode=ops: in rounds, every task adds atomic_n to the kernel's op_count
 * with locked increments, in batches of 100 alternating between its two
 * services (ops_add, ops_tally); when all have arrived, task 0 reads the
 * count through each service and checks both against the exact total.
 */
static volatile u64 ops_arrived, ops_checked __attribute__((aligned(64)));

static void ops_rounds(u64 task, u64 tasks, u64 n)
{
	u64 r, done;

	for (r = 1;; r++) {
		for (done = 0; done < n; done += 100)
			sys3(SYS_OPS, n - done < 100 ? n - done : 100, (done / 100) & 1, 0);
		user_progress[task] = r;
		__atomic_add_fetch(&ops_arrived, 1, __ATOMIC_SEQ_CST);
		while (__atomic_load_n(&ops_arrived, __ATOMIC_ACQUIRE) < tasks * r)
			__asm__ volatile("pause");
		if (task == 0) {
			char line[160];
			unsigned k = 0;
			u64 via_tally = sys3(SYS_OPS, 0, 1, 0), via_add = sys3(SYS_OPS, 0, 0, 0);
			u64 want = tasks * n * r;

			k += put_str(line + k, "[tk] ops round ");
			k += put_dec(line + k, r);
			k += put_str(line + k, via_tally == want && via_add == want ? " exact" : " LOST");
			k += put_str(line + k, " tally ");
			k += put_dec(line + k, via_tally);
			k += put_str(line + k, " add ");
			k += put_dec(line + k, via_add);
			k += put_str(line + k, " want ");
			k += put_dec(line + k, want);
			line[k++] = '\n';
			sys3(SYS_WRITE, (u64)line, k, 0);
			__atomic_store_n(&ops_checked, r, __ATOMIC_RELEASE);
		}
		while (__atomic_load_n(&ops_checked, __ATOMIC_ACQUIRE) < r)
			__asm__ volatile("pause");
	}
}

/*
 * mode=ctl: task 0 sets tk_limits.max through the ctl table (SYS_CTL 0) to
 * a new value at every step and charges 1 through limits_charge, which
 * must have charged against that value; the other tasks charge 1 at a
 * time and count. Every `every` steps task 0 reads `used` through the ctl
 * table, which must lie between every charge counted before the read and
 * every charge counted after it (plus one in flight each): no charge lost,
 * whichever copy and code each went through.
 */
static volatile u64 ctl_charges[8] __attribute__((aligned(64)));

static void ctl_loop(u64 task, u64 tasks, u64 every)
{
	u64 i, bad = 0, round = 0;

	if (!every)
		every = 1000;
	if (tasks > 8)
		tasks = 8;
	for (i = 1;; i++) {
		if (task != 0) {
			sys3(SYS_CTL, 2, 0, 1);
			ctl_charges[task]++;
			user_progress[task] = i;
			continue;
		}
		sys3(SYS_CTL, 0, 1, 1000 + i);
		if (sys3(SYS_CTL, 2, 0, 1) != 1000 + i)
			bad++;
		ctl_charges[0]++;
		if (i % every == 0) {
			char line[160];
			unsigned k = 0;
			u64 t, before = 0, after = 0, used;

			for (t = 0; t < tasks; t++)
				before += ctl_charges[t];
			used = sys3(SYS_CTL, 1, 0, 0);
			for (t = 0; t < tasks; t++)
				after += ctl_charges[t];
			/* Registers the ctl table again if a patch asks. */
			sys3(SYS_CTL, 3, 0, 0);
			if (used < before || used > after + tasks)
				bad++;
			k += put_str(line + k, "[tk] ctl round ");
			k += put_dec(line + k, ++round);
			k += put_str(line + k, bad ? " BAD" : " ok");
			k += put_str(line + k, " max ");
			k += put_dec(line + k, sys3(SYS_CTL, 0, 0, 0));
			k += put_str(line + k, " used ");
			k += put_dec(line + k, used);
			k += put_str(line + k, " charged ");
			k += put_dec(line + k, before);
			line[k++] = '\n';
			sys3(SYS_WRITE, (u64)line, k, 0);
			user_progress[task] = round;
		}
	}
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/*
 * mode=stall: read the TSC in a tight loop and, every `every` reads, report
 * the longest gap between two reads since the last report, in TSC cycles:
 * the longest the task was kept from running (a VMM pause or handover, a
 * timer interrupt). The report itself is outside the measured gaps.
 */
static __attribute__((noreturn)) void stall_loop(u64 task, u64 every)
{
	char line[128];
	u64 i, t, prev, max = 0, round = 0;
	unsigned n;

	if (!every)
		every = 1000000;
	prev = rdtsc();
	for (i = 1;; i++) {
		t = rdtsc();
		if (t - prev > max)
			max = t - prev;
		prev = t;
		if (i % every)
			continue;
		n = 0;
		n += put_str(line + n, "[tk] task ");
		n += put_dec(line + n, task);
		n += put_str(line + n, " stall round ");
		n += put_dec(line + n, ++round);
		n += put_str(line + n, " max_cycles ");
		n += put_dec(line + n, max);
		line[n++] = '\n';
		sys3(SYS_WRITE, (u64)line, n, 0);
		user_progress[task] = round;
		max = 0;
		prev = rdtsc();
	}
}

__attribute__((noreturn)) void user_main(u64 task)
{
	u64 iters = sys3(SYS_PARAM, P_ITERS, 0, 0), every = sys3(SYS_PARAM, P_REPORT, 0, 0);
	u64 mode = sys3(SYS_PARAM, P_MODE, 0, 0), spin = sys3(SYS_PARAM, P_SPIN, 0, 0);
	u64 work = sys3(SYS_PARAM, P_WORK, 0, 0);
	u64 i, counter = 0, mixed = 0;
	volatile u64 sink = 0;

	/* mode=wbench: plain 8-byte stores to atomic_page.count, forever (the
	 * write-control benchmark measures them trapped and not). */
	if (mode == MODE_WBENCH)
		for (i = 1;; i++)
			atomic_page.count = i;
	if (mode == MODE_ATOMIC)
		atomic_rounds(task, sys3(SYS_PARAM, P_TASKS, 0, 0), sys3(SYS_PARAM, P_ATOMIC_N, 0, 0));
	if (mode == MODE_STALL)
		stall_loop(task, every);
	if (mode == MODE_OPS)
		ops_rounds(task, sys3(SYS_PARAM, P_TASKS, 0, 0), sys3(SYS_PARAM, P_ATOMIC_N, 0, 0));
	if (mode == MODE_CTL)
		ctl_loop(task, sys3(SYS_PARAM, P_TASKS, 0, 0), every);
	for (i = 1; iters == 0 || i <= iters; i++) {
		u64 j;

		if (mode == MODE_POKE) {
			poke(task, i, every);
			user_progress[task] = i;
			continue;
		}

		if (mode != MODE_USER || (every && i % every == 0)) {
			counter = sys3(SYS_COUNTER, 0, 0, 0);
			if (sys3(SYS_STATS, task, i, 0) != i && mode != MODE_USER)
				stats_lost[task]++;
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

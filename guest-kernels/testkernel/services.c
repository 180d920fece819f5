// SPDX-License-Identifier: Apache-2.0
/*
 * Kernel services that user tasks call through syscalls. These are the
 * functions lucos live-patches in its tests and demo: a version string, a
 * counter, and a table of structs that every task updates.
 */
#include "tk.h"

volatile u64 service_counter;
struct task_stat stats_table[MAX_TASKS];

/* The version banner, read by the VMM (symbol-db) to tell builds apart. */
const char tk_banner[] = "lucos test kernel version 1.0 #1 SMP\n";

/* A local helper whose name console.c uses too: duplicate local symbols are
 * normal in Linux, and symbol lookups must tell them apart. */
static __attribute__((noinline, used)) u64 mix(u64 v)
{
	return (v ^ (v >> 29)) * 0xbf58476d1ce4e5b9ULL;
}

const char *lucos_version(void)
{
	return "testkernel 1.0";
}

u64 counter_next(void)
{
	return __atomic_add_fetch(&service_counter, 1, __ATOMIC_SEQ_CST);
}

/* Busy work inside a service, so that vCPUs are often caught mid-call. */
__attribute__((noinline)) void service_delay(u64 n)
{
	volatile u64 i;

	for (i = 0; i < n; i++)
		;
}

/*
 * A call chain of three services, outer -> middle -> inner, each putting
 * its version mark in buf[0], buf[1], buf[2] with work before and after the
 * call it makes. A patch of all three must switch them as one: a call that
 * starts in old code must not finish in new code ("112" is a broken switch).
 * noinline: within one file gcc would otherwise fold inner into middle.
 */
__attribute__((noinline)) void tri_inner(char *buf, u64 work)
{
	service_delay(work);
	buf[2] = '1';
}

__attribute__((noinline)) void tri_middle(char *buf, u64 work)
{
	buf[1] = '1';
	service_delay(work);
	tri_inner(buf, work);
	service_delay(work);
}

__attribute__((noinline)) void tri_outer(char *buf, u64 work)
{
	buf[0] = '1';
	service_delay(work);
	tri_middle(buf, work);
	service_delay(work);
}

u64 stats_update(u32 task, u32 cpu, u64 value)
{
	struct task_stat *s;

	if (task >= MAX_TASKS)
		return 0;
	s = &stats_table[task];
	s->id = task;
	s->cpu = cpu;
	s->calls++;
	s->last_value = value;
	s->sum += value;
	return s->calls;
}

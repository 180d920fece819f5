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

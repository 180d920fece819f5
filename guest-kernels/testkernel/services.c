// SPDX-License-Identifier: Apache-2.0
/*
 * Kernel services that user tasks call through syscalls. These are the
 * functions lucos live-patches in its tests and demo: a version string, a
 * counter, and a table of structs that every task updates.
 */
#include "tk.h"

volatile u64 service_counter;
struct task_stat stats_table[MAX_TASKS];

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

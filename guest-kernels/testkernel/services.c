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

/*
 * lucos_version and text_scratch share one page of kernel text, in a
 * section of their own that starts a page (text_scratch's alignment): the
 * write-control tests protect a patch's jump on that page and write the
 * rest of it.
 */
__attribute__((section(".text.wc"))) const char *lucos_version(void)
{
	return "testkernel 1.0";
}

/* 64 bytes of kernel text that nothing executes: a place on lucos_version's
 * page for the kernel to write its own text (as text_poke does). */
__asm__(".pushsection .text.wc,\"ax\"\n"
	".balign 4096\n"
	".globl text_scratch\n"
	".type text_scratch, @object\n"
	"text_scratch: .fill 64, 1, 0xcc\n"
	".size text_scratch, 64\n"
	".popsection");
extern volatile u64 text_scratch[8];

/* lucos_version's first 8 bytes as built, saved at boot. */
static u64 lucos_version_orig;

void text_poke_init(void)
{
	lucos_version_orig = *(volatile u64 *)(void *)lucos_version;
}

/*
 * SYS_POKE: the kernel writing into its own text, as a buggy driver or a
 * rootkit would (which 0: put lucos_version's first 8 bytes back as they
 * were built, undoing any live patch's jump), and as the kernel's own text
 * patching does elsewhere on the page (which 1 + N: store `value` in
 * text_scratch[1 + N], N < 7, and return what reads back).
 */
__attribute__((noinline)) u64 text_poke_service(u64 which, u64 value)
{
	volatile u64 *entry = (volatile u64 *)(void *)lucos_version;

	if (which == 0) {
		*entry = lucos_version_orig;
		return *entry == lucos_version_orig;
	}
	which = 1 + (which - 1) % 7;
	text_scratch[which] = value;
	return text_scratch[which];
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

/* The table's second writer, the same update (SYS_STATS sends it the odd
 * values): a patch replacing only stats_update leaves old code writing. */
u64 stats_record(u32 task, u32 cpu, u64 value)
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

/* A counter two services increment with locked instructions (SYS_OPS,
 * mode=ops): a patch that changes its layout and replaces one leaves both
 * copies incremented at once, by old and new code on every vCPU. */
struct op_count {
	u64 ops;
};
struct op_count op_count;

u64 ops_add(u64 n)
{
	u64 i;

	for (i = 0; i < n; i++)
		__atomic_add_fetch(&op_count.ops, 1, __ATOMIC_RELAXED);
	return __atomic_load_n(&op_count.ops, __ATOMIC_RELAXED);
}

u64 ops_tally(u64 n)
{
	u64 i;

	for (i = 0; i < n; i++)
		__atomic_add_fetch(&op_count.ops, 1, __ATOMIC_RELAXED);
	return __atomic_load_n(&op_count.ops, __ATOMIC_RELAXED);
}

/*
 * tk_limits: generic code reads and writes it through tk_ctls' pointers
 * (tk_ctl_access knows no layout, like Linux's proc_doulongvec_minmax), and
 * limits_charge names it. A patch that changes its layout replaces
 * limits_charge and moves tk_ctls' pointers to the new copy (lucos build
 * --repoint); then nothing uses the old copy and the change can retire.
 */
struct tk_limits tk_limits = { .max = 1 };

struct tk_ctl tk_ctls[2] = {
	{ "max", &tk_limits.max },
	{ "used", &tk_limits.used },
};

/*
 * The ctl table as registered at run time (boot option ctl_copied): a copy
 * of tk_ctls made at boot, as Linux copies sysctl entries when it registers
 * them. Its pointers into tk_limits exist only in memory, never in the
 * image, so no build can find them: lucos finds them by scanning memory,
 * and a change of tk_limits does not retire while they point at the old
 * copy. SYS_CTL 3 copies tk_ctls again when tk_ctl_refresh_due() says so
 * (a patch says so).
 */
struct tk_ctl tk_ctls_rt[2];
struct tk_ctl *tk_ctl_table = tk_ctls;

__attribute__((noinline)) u64 tk_ctl_refresh_due(void)
{
	return 0;
}

void tk_ctls_register(void)
{
	unsigned i;

	for (i = 0; i < sizeof(tk_ctls) / sizeof(tk_ctls[0]); i++)
		tk_ctls_rt[i] = tk_ctls[i];
	tk_ctl_table = tk_ctls_rt;
}

u64 tk_ctl_access(u64 which, u64 write, u64 value)
{
	volatile u64 *p;

	if (which >= sizeof(tk_ctls) / sizeof(tk_ctls[0]))
		return (u64)-1;
	p = tk_ctl_table[which].data;
	if (write)
		*p = value;
	return *p;
}

/* Charges n and returns the limit the charge was made against. */
u64 limits_charge(u64 n)
{
	__atomic_add_fetch(&tk_limits.used, n, __ATOMIC_RELAXED);
	return __atomic_load_n(&tk_limits.max, __ATOMIC_RELAXED);
}

/* The table's other users, kept out of kernel.c so that a patch changing
 * its layout can replace every function that touches it (and the change
 * can then retire). which: 0 calls, 1 sum, 2 id, 3 cpu, 4 last value. */
u64 stats_read(u32 task, u32 which)
{
	struct task_stat *s;

	if (task >= MAX_TASKS)
		return 0;
	s = &stats_table[task];
	switch (which) {
	case 0:
		return s->calls;
	case 1:
		return s->sum;
	case 2:
		return s->id;
	case 3:
		return s->cpu;
	default:
		return s->last_value;
	}
}

void *stats_addr(void)
{
	return stats_table;
}

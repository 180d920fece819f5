/* SPDX-License-Identifier: Apache-2.0 */
#ifndef TK_H
#define TK_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;

#define MAX_CPUS 8
#define MAX_TASKS MAX_CPUS
#define KSTACK_SIZE 16384
#define PAGE_SIZE 4096UL

/* Virtual layout (mirrors Linux x86-64). */
#define KERNEL_MAP_PAGES_2M 16 /* kernel window maps physical 0..32 MiB */
#define KERNEL_MAP_BASE 0xffffffff80000000UL /* -> phys 0, 2 MiB pages */
#define DIRECT_MAP_BASE 0xffff888000000000UL /* -> phys 0, 1 GiB pages */
#define USER_BASE 0x400000UL                 /* user image, 4 KiB pages */
#define USER_STACK_TOP 0x800000UL            /* task stacks below, guard pages between */
#define USER_STACK_PAGES 4

/* Segment selectors. */
#define KERNEL_CS 0x10
#define KERNEL_DS 0x18
#define USER32_CS 0x23
#define USER_DS 0x2b
#define USER_CS 0x33
#define TSS_SEL 0x40

/* System call numbers (rax); arguments in rdi, rsi, rdx. */
#define SYS_EXIT 0
#define SYS_WRITE 1     /* (buf, len) */
#define SYS_VERSION 2   /* (buf, len) -> copies the version string */
#define SYS_COUNTER 3   /* () -> next value of the global service counter */
#define SYS_STATS 4     /* (task, value) -> calls so far for task: odd values through stats_record, even through stats_update */
#define SYS_SPIN_CLI 5  /* (iterations) spin in kernel mode with interrupts off */
#define SYS_TICKS 6     /* () -> timer ticks on this cpu */
#define SYS_CPU 7       /* () -> current cpu index */
#define SYS_PARAM 8     /* (which) -> a boot option, see user.c */
#define SYS_TRIPLE 9    /* (buf, work) -> 3 version marks from a 3-function call chain */
#define SYS_POKE 10     /* (which, value): kernel writes into its own text, see services.c */
#define SYS_OPS 12       /* (n, path) -> op_count.ops after n locked increments through ops_add (path 0) or ops_tally (1) */
#define SYS_STAT_READ 11 /* (task, which) -> stats_table[task] .calls (0), .sum (1), .last_value (4): read by unpatched code */
#define SYS_CTL 13       /* (which, write, value): tk_ctls[which] (0 max, 1 used) read, or written then read, through its pointer; which 2: limits_charge(value); which 3: copy tk_ctls into the run-time table again if tk_ctl_refresh_due() */

/* Per-CPU area, reached through GS base in kernel mode. Offsets used in entry.S. */
struct percpu {
	u64 kstack_top;  /* 0 */
	u64 user_rsp;    /* 8 */
	u64 cpu;         /* 16 */
	u64 ticks;       /* 24 */
	u64 syscalls;    /* 32 */
	u64 task;        /* 40: task id running here, or -1 */
};

/* Saved register frame built by entry.S for interrupts and exceptions. */
struct regs {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

/* Limits set and read through a table of pointers to their members (as
 * Linux's sysctl tables point into the kernel's objects) and charged by
 * limits_charge, which names the object. */
struct tk_limits {
	u64 max;
	u64 used;
};

/* A row of the stats table that user tasks update through SYS_STATS.
 * A later live update changes this layout. */
struct task_stat {
	u32 id;
	u32 cpu;
	u32 calls;
	u64 last_value;
	u64 sum;
};

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void wrmsr(u32 msr, u64 v) { __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32))); }
static inline u64 rdmsr(u32 msr) { u32 lo, hi; __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr)); return ((u64)hi << 32) | lo; }
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline u64 this_cpu_read(unsigned long off)
{
	u64 v;
	__asm__ volatile("movq %%gs:(%1), %0" : "=r"(v) : "r"(off));
	return v;
}

/* console.c: kprintf(KERN_WARNING "...") logs at that level (the prefix is
 * not printed); a line without one at KERN_INFO. */
#define KERN_SOH "\001"
#define KERN_EMERG KERN_SOH "0"
#define KERN_ERR KERN_SOH "3"
#define KERN_WARNING KERN_SOH "4"
#define KERN_INFO KERN_SOH "6"
void console_lock(void);
void console_unlock(void);
void putc_raw(char c);
void puts_raw(const char *s);
void kprintf(const char *fmt, ...);
void console_write(const char *s, u64 n); /* a user task's output (SYS_WRITE) */
__attribute__((noreturn)) void debug_exit(u8 status);
__attribute__((noreturn)) void panic(const char *msg);

/* kernel.c: the timer's ticks on CPU 0, and nanoseconds per tick (0 until
 * the timer runs). */
extern volatile u64 jiffies;
extern u64 tick_ns;

/* lib.c */
void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);
unsigned long strlen(const char *s);
int strncmp(const char *a, const char *b, unsigned long n);

/* services.c: the services user tasks call, and that live patches replace. */
const char *lucos_version(void);
u64 counter_next(void);
void service_delay(u64 n);
void tri_outer(char *buf, u64 work);
void tri_middle(char *buf, u64 work);
void tri_inner(char *buf, u64 work);
u64 stats_update(u32 task, u32 cpu, u64 value);
u64 stats_record(u32 task, u32 cpu, u64 value);
u64 ops_add(u64 n);
u64 ops_tally(u64 n);
struct tk_ctl {
	const char *name;
	u64 *data;
};
extern struct tk_limits tk_limits;
extern struct tk_ctl tk_ctls[2];
u64 tk_ctl_access(u64 which, u64 write, u64 value);
void tk_ctls_register(void);
u64 tk_ctl_refresh_due(void);
u64 limits_charge(u64 n);
u64 text_poke_service(u64 which, u64 value);
void text_poke_init(void);
extern struct task_stat stats_table[MAX_TASKS];
u64 stats_read(u32 task, u32 which);
void *stats_addr(void);
extern volatile u64 service_counter;

#endif

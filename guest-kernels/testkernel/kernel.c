// SPDX-License-Identifier: Apache-2.0
/*
 * lucos test kernel: boot, paging, descriptor tables, x2APIC timer, SMP,
 * syscalls and user tasks. Kernel code sticks to general-purpose registers
 * and returns to user mode with iretq, so it runs on PVM and on real KVM.
 */
#include "boot.h"
#include "tk.h"

#define PTE_P 0x1UL
#define PTE_W 0x2UL
#define PTE_U 0x4UL
#define PTE_PS 0x80UL
#define PTE_G 0x100UL
#define PTE_NX (1UL << 63)

#define MSR_APIC_BASE 0x1b
#define MSR_EFER 0xc0000080
#define MSR_STAR 0xc0000081
#define MSR_LSTAR 0xc0000082
#define MSR_FMASK 0xc0000084
#define MSR_GS_BASE 0xc0000101
#define MSR_X2APIC_EOI 0x80b
#define MSR_X2APIC_SVR 0x80f
#define MSR_X2APIC_LVT_TIMER 0x832
#define MSR_X2APIC_TMICT 0x838
#define MSR_X2APIC_TDCR 0x83e

#define VEC_TIMER 32
#define VEC_SPURIOUS 255

/* Linker-script symbols. */
extern char __user_start[], __user_text_end[], __user_end[];
extern const u64 __user_lma;
extern char __kernel_start[], __kernel_end[];

extern void syscall_entry(void);
extern u8 boot_stacks[];
extern void load_segments(void);
extern __attribute__((noreturn)) void enter_user(u64 rip, u64 rsp, u64 arg);
extern void user_main(u64 task);

/* Boot parameters, set by the BSP before the APs are released. */
static u32 nr_cpus;
static u64 mem_bytes;
static char cmdline[256];
static u64 opt_tasks, opt_iters, opt_report, opt_spin, opt_work, opt_timer_hz, opt_selftest;
static u64 opt_mode, opt_atomic_n = 1000000;
static u32 boot_flags;
extern volatile u64 user_service_trap;

struct percpu percpu[MAX_CPUS];
static volatile u32 smp_go, cpus_online, tasks_done;
volatile u64 jiffies;
u64 tick_ns;
static volatile u64 task_iters[MAX_TASKS];

/* Page tables built by the kernel itself. */
static u64 pml4[512] __attribute__((aligned(4096)));
static u64 pdpt_kernel[512] __attribute__((aligned(4096)));
static u64 pd_kernel[512] __attribute__((aligned(4096)));
static u64 pdpt_direct[512] __attribute__((aligned(4096)));
#define DIRECT_MAP_GIB 4
static u64 pd_direct[DIRECT_MAP_GIB][512] __attribute__((aligned(4096)));
static const char *direct_page_size;
static u64 pdpt_user[512] __attribute__((aligned(4096)));
static u64 pd_user[512] __attribute__((aligned(4096)));
static u64 pt_user[2][512] __attribute__((aligned(4096)));
static u8 user_stacks[MAX_TASKS][USER_STACK_PAGES * PAGE_SIZE] __attribute__((aligned(4096)));

struct tss {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} __attribute__((packed));

struct idt_entry {
	u16 off_lo, sel;
	u8 ist, attr;
	u16 off_mid;
	u32 off_hi, zero;
} __attribute__((packed));

struct desc_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

static u64 gdt[MAX_CPUS][10] __attribute__((aligned(16)));
static struct tss tss[MAX_CPUS] __attribute__((aligned(16)));
static struct idt_entry idt[256] __attribute__((aligned(16)));

enum { MODE_LOOP, MODE_SPIN, MODE_USER, MODE_TRIPLE, MODE_POKE, MODE_ATOMIC, MODE_WBENCH, MODE_OPS, MODE_STALL, MODE_CTL };
enum { P_ITERS, P_REPORT, P_MODE, P_SPIN, P_WORK, P_ATOMIC_N, P_TASKS };

static inline u64 kva_to_pa(const void *p)
{
	return (u64)p - KERNEL_MAP_BASE;
}

static inline void *pa_to_kva(u64 pa)
{
	return (void *)(pa + DIRECT_MAP_BASE);
}

static u64 parse_u64(const char *s, unsigned long n)
{
	u64 v = 0;

	while (n-- && *s >= '0' && *s <= '9')
		v = v * 10 + (u64)(*s++ - '0');
	return v;
}

/* "key=value key flag ..." */
static void parse_cmdline(void)
{
	const char *p = cmdline;

	while (*p) {
		const char *key, *val = 0;
		unsigned long klen, vlen = 0;

		while (*p == ' ')
			p++;
		key = p;
		while (*p && *p != ' ' && *p != '=')
			p++;
		klen = (unsigned long)(p - key);
		if (*p == '=') {
			val = ++p;
			while (*p && *p != ' ')
				p++;
			vlen = (unsigned long)(p - val);
		}
		if (!klen)
			continue;
#define KEY(name) (klen == sizeof(name) - 1 && !strncmp(key, name, klen))
		if (KEY("tasks") && val)
			opt_tasks = parse_u64(val, vlen);
		else if (KEY("iters") && val)
			opt_iters = parse_u64(val, vlen);
		else if (KEY("report") && val)
			opt_report = parse_u64(val, vlen);
		else if (KEY("spin") && val)
			opt_spin = parse_u64(val, vlen);
		else if (KEY("work") && val)
			opt_work = parse_u64(val, vlen);
		else if (KEY("hz") && val)
			opt_timer_hz = parse_u64(val, vlen);
		else if (KEY("selftest"))
			opt_selftest = 1;
		else if (KEY("mode") && val && vlen == 4 && !strncmp(val, "spin", 4))
			opt_mode = MODE_SPIN;
		else if (KEY("mode") && val && vlen == 4 && !strncmp(val, "user", 4))
			opt_mode = MODE_USER;
		else if (KEY("mode") && val && vlen == 6 && !strncmp(val, "triple", 6))
			opt_mode = MODE_TRIPLE;
		else if (KEY("mode") && val && vlen == 4 && !strncmp(val, "loop", 4))
			opt_mode = MODE_LOOP;
		else if (KEY("mode") && val && vlen == 4 && !strncmp(val, "poke", 4))
			opt_mode = MODE_POKE;
		else if (KEY("mode") && val && vlen == 6 && !strncmp(val, "atomic", 6))
			opt_mode = MODE_ATOMIC;
		else if (KEY("mode") && val && vlen == 6 && !strncmp(val, "wbench", 6))
			opt_mode = MODE_WBENCH;
		else if (KEY("mode") && val && vlen == 3 && !strncmp(val, "ops", 3))
			opt_mode = MODE_OPS;
		else if (KEY("mode") && val && vlen == 5 && !strncmp(val, "stall", 5))
			opt_mode = MODE_STALL;
		else if (KEY("mode") && val && vlen == 3 && !strncmp(val, "ctl", 3))
			opt_mode = MODE_CTL;
		else if (KEY("ctl_moved"))
			/* The kernel re-aims a ctl pointer at boot: the image's
			 * initial value no longer holds (a patch built from the
			 * image expects it and must be refused). */
			tk_ctls[0].data = tk_ctls[1].data;
		else if (KEY("ctl_copied"))
			/* Generic code goes through a copy of the ctl table
			 * made now (tk_ctls_register). */
			tk_ctls_register();
		else if (KEY("atomic_n") && val)
			opt_atomic_n = parse_u64(val, vlen);
		else
			kprintf("[tk] ignoring unknown option at '%s'\n", key);
#undef KEY
	}
}

static u64 user_stack_top(u64 task)
{
	return USER_STACK_TOP - task * (USER_STACK_PAGES + 1) * PAGE_SIZE;
}

static void map_user_page(u64 va, u64 pa, u64 flags)
{
	u64 pdi = (va >> 21) & 511, pti = (va >> 12) & 511;

	if (pdi < 2 || pdi > 3)
		panic("user mapping outside 0x400000-0x800000");
	pt_user[pdi - 2][pti] = pa | flags | PTE_P | PTE_U;
}

static void build_page_tables(int have_1g, int have_nx)
{
	u64 nx = have_nx ? PTE_NX : 0;
	u64 va, i;

	/* 0xffffffff80000000 -> 0: the first 32 MiB (kernel and user images) in
	 * 2 MiB pages. Like Linux after cleanup_highmap, the rest of this 1 GiB
	 * window stays unmapped; the VMM maps its patch area there. */
	for (i = 0; i < KERNEL_MAP_PAGES_2M; i++)
		pd_kernel[i] = (i << 21) | PTE_P | PTE_W | PTE_PS | PTE_G;
	pdpt_kernel[510] = kva_to_pa(pd_kernel) | PTE_P | PTE_W;
	pml4[511] = kva_to_pa(pdpt_kernel) | PTE_P | PTE_W;

	/* 0xffff888000000000 -> 0: direct map of RAM, 1 GiB pages where the CPU has
	 * them (pdpe1gb), else 2 MiB pages. */
	direct_page_size = have_1g ? "1g" : "2m";
	for (i = 0; i < DIRECT_MAP_GIB && (i << 30) < mem_bytes; i++) {
		if (have_1g) {
			pdpt_direct[i] = (i << 30) | PTE_P | PTE_W | PTE_PS | PTE_G | nx;
		} else {
			u64 j;
			for (j = 0; j < 512; j++)
				pd_direct[i][j] = (i << 30) | (j << 21) | PTE_P | PTE_W | PTE_PS | PTE_G | nx;
			pdpt_direct[i] = kva_to_pa(pd_direct[i]) | PTE_P | PTE_W;
		}
	}
	pml4[(DIRECT_MAP_BASE >> 39) & 511] = kva_to_pa(pdpt_direct) | PTE_P | PTE_W;

	/* User space: 4 KiB pages at 0x400000 (image) and below 0x800000 (stacks). */
	pd_user[2] = kva_to_pa(pt_user[0]) | PTE_P | PTE_W | PTE_U;
	pd_user[3] = kva_to_pa(pt_user[1]) | PTE_P | PTE_W | PTE_U;
	pdpt_user[0] = kva_to_pa(pd_user) | PTE_P | PTE_W | PTE_U;
	pml4[0] = kva_to_pa(pdpt_user) | PTE_P | PTE_W | PTE_U;

	for (va = (u64)__user_start; va < (u64)__user_end; va += PAGE_SIZE) {
		u64 pa = __user_lma + (va - (u64)__user_start);
		u64 flags = va < (u64)__user_text_end ? 0 : (PTE_W | nx);
		map_user_page(va, pa, flags);
	}
	for (i = 0; i < MAX_TASKS; i++) {
		u64 top = user_stack_top(i), p;
		for (p = 0; p < USER_STACK_PAGES; p++)
			map_user_page(top - (p + 1) * PAGE_SIZE,
				      kva_to_pa(user_stacks[i]) + (USER_STACK_PAGES - 1 - p) * PAGE_SIZE,
				      PTE_W | nx);
	}
}

static void set_idt_gate(int vec, void (*handler)(void))
{
	u64 a = (u64)handler;

	idt[vec].off_lo = (u16)a;
	idt[vec].sel = KERNEL_CS;
	idt[vec].ist = 0;
	idt[vec].attr = 0x8e;
	idt[vec].off_mid = (u16)(a >> 16);
	idt[vec].off_hi = (u32)(a >> 32);
	idt[vec].zero = 0;
}

#define DECL_ISR(n) extern void isr##n(void)
DECL_ISR(0); DECL_ISR(1); DECL_ISR(2); DECL_ISR(3); DECL_ISR(4); DECL_ISR(5);
DECL_ISR(6); DECL_ISR(7); DECL_ISR(8); DECL_ISR(9); DECL_ISR(10); DECL_ISR(11);
DECL_ISR(12); DECL_ISR(13); DECL_ISR(14); DECL_ISR(15); DECL_ISR(16); DECL_ISR(17);
DECL_ISR(18); DECL_ISR(19); DECL_ISR(32); DECL_ISR(36); DECL_ISR(255);

static void build_idt(void)
{
	void (*exc[20])(void) = { isr0, isr1, isr2, isr3, isr4, isr5, isr6, isr7, isr8, isr9,
				  isr10, isr11, isr12, isr13, isr14, isr15, isr16, isr17, isr18, isr19 };
	int i;

	for (i = 0; i < 20; i++)
		set_idt_gate(i, exc[i]);
	set_idt_gate(VEC_TIMER, isr32);
	set_idt_gate(36, isr36);
	set_idt_gate(VEC_SPURIOUS, isr255);
	/* #BP is reachable from user mode: the kernel-service trap on PVM hosts. */
	idt[3].attr = 0xee;
}

static void cpu_tables_init(u32 cpu)
{
	struct desc_ptr gp, ip;
	u64 base = (u64)&tss[cpu];

	/* Linux's layout: the PVM flavour of KVM requires the user selectors to be
	 * the host's (__USER32_CS 0x23, __USER_DS 0x2b, __USER_CS 0x33). */
	gdt[cpu][0] = 0;
	gdt[cpu][1] = 0x00cf9a000000ffffUL; /* 0x08: kernel code, 32-bit */
	gdt[cpu][2] = 0x00af9a000000ffffUL; /* 0x10: kernel code */
	gdt[cpu][3] = 0x00cf92000000ffffUL; /* 0x18: kernel data */
	gdt[cpu][4] = 0x00cffa000000ffffUL; /* 0x23: user code, 32-bit */
	gdt[cpu][5] = 0x00cff2000000ffffUL; /* 0x2b: user data */
	gdt[cpu][6] = 0x00affa000000ffffUL; /* 0x33: user code */
	gdt[cpu][7] = 0;
	gdt[cpu][8] = (sizeof(struct tss) - 1) | ((base & 0xffffff) << 16) | (0x89UL << 40) |
		      (((base >> 24) & 0xff) << 56);
	gdt[cpu][9] = base >> 32;
	tss[cpu].rsp[0] = percpu[cpu].kstack_top;
	tss[cpu].iomap_base = sizeof(struct tss);

	gp.limit = sizeof(gdt[cpu]) - 1;
	gp.base = (u64)gdt[cpu];
	__asm__ volatile("lgdt %0" ::"m"(gp));
	load_segments();
	__asm__ volatile("ltr %w0" ::"r"(TSS_SEL));
	ip.limit = sizeof(idt) - 1;
	ip.base = (u64)idt;
	__asm__ volatile("lidt %0" ::"m"(ip));
}

static void apic_timer_init(void)
{
	u64 hz = opt_timer_hz ? opt_timer_hz : 100;

	tick_ns = 1000000000UL / hz;
	wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | (1UL << 11) | (1UL << 10));
	wrmsr(MSR_X2APIC_SVR, 0x100 | VEC_SPURIOUS);
	wrmsr(MSR_X2APIC_TDCR, 0x3); /* divide by 16 */
	wrmsr(MSR_X2APIC_LVT_TIMER, VEC_TIMER | (1UL << 17)); /* periodic */
	/* KVM's APIC timer runs at 1 GHz: 62.5 MHz after the divider. */
	wrmsr(MSR_X2APIC_TMICT, 62500000UL / hz);
}

static void cpu_init(u32 cpu)
{
	u64 efer;

	percpu[cpu].cpu = cpu;
	percpu[cpu].task = (u64)-1;
	/* The syscall and interrupt stack is this CPU's boot stack (entry.S). */
	percpu[cpu].kstack_top = (u64)boot_stacks + (u64)(cpu + 1) * KSTACK_SIZE;
	wrmsr(MSR_GS_BASE, (u64)&percpu[cpu]);

	efer = rdmsr(MSR_EFER) | 1; /* SCE */
	{
		u32 a, b, c, d;
		cpuid(0x80000001, 0, &a, &b, &c, &d);
		if (d & (1u << 20))
			efer |= 1UL << 11; /* NXE */
	}
	wrmsr(MSR_EFER, efer);
	__asm__ volatile("mov %0, %%cr3" ::"r"(kva_to_pa(pml4)) : "memory");
	cpu_tables_init(cpu);
	wrmsr(MSR_STAR, ((u64)USER32_CS << 48) | ((u64)KERNEL_CS << 32));
	wrmsr(MSR_LSTAR, (u64)syscall_entry);
	wrmsr(MSR_FMASK, 0x700); /* TF, IF, DF */
	apic_timer_init();
}

static void print_map(const char *what, u64 va, u64 pa, const char *size)
{
	kprintf("[tk] map %s va=%lx pa=%lx size=%s\n", what, va, pa, size);
}

static void selftest(void)
{
	u64 stack0 = user_stack_top(0);

	kprintf("[tk] layout task_stat size=%u id=%u cpu=%u calls=%u last_value=%u sum=%u\n",
		(unsigned)sizeof(struct task_stat), (unsigned)__builtin_offsetof(struct task_stat, id),
		(unsigned)__builtin_offsetof(struct task_stat, cpu),
		(unsigned)__builtin_offsetof(struct task_stat, calls),
		(unsigned)__builtin_offsetof(struct task_stat, last_value),
		(unsigned)__builtin_offsetof(struct task_stat, sum));
	kprintf("[tk] layout boot_info size=%u magic=%u version=%u nr_cpus=%u mem_bytes=%u "
		"cmdline_gpa=%u cmdline_len=%u flags=%u\n",
		(unsigned)sizeof(struct boot_info), (unsigned)__builtin_offsetof(struct boot_info, magic),
		(unsigned)__builtin_offsetof(struct boot_info, version),
		(unsigned)__builtin_offsetof(struct boot_info, nr_cpus),
		(unsigned)__builtin_offsetof(struct boot_info, mem_bytes),
		(unsigned)__builtin_offsetof(struct boot_info, cmdline_gpa),
		(unsigned)__builtin_offsetof(struct boot_info, cmdline_len),
		(unsigned)__builtin_offsetof(struct boot_info, flags));
	print_map("kernel_text", (u64)lucos_version, kva_to_pa((void *)lucos_version), "2m");
	print_map("kernel_data", (u64)stats_addr(), kva_to_pa(stats_addr()), "2m");
	print_map("user_text", (u64)user_main, __user_lma + ((u64)user_main - (u64)__user_start), "4k");
	print_map("user_stack", stack0 - 8, kva_to_pa(user_stacks[0]) + USER_STACK_PAGES * PAGE_SIZE - 8, "4k");
	print_map("direct", (u64)pa_to_kva(0x1234567), 0x1234567, direct_page_size);
	kprintf("[tk] unmapped guard va=%lx\n", stack0);
	kprintf("[tk] unmapped null va=%lx\n", 0UL);
	kprintf("[tk] unmapped hole va=%lx\n", 0x0000100000000000UL);
}

static __attribute__((noreturn, noinline)) void cpu_idle(void)
{
	for (;;)
		__asm__ volatile("sti; hlt; cli");
}

static void finish(void)
{
	u32 i;

	kprintf("[tk] done tasks=%lu counter=%lu jiffies=%lu\n", opt_tasks, service_counter, jiffies);
	for (i = 0; i < opt_tasks; i++)
		kprintf("[tk] stat task=%lu cpu=%lu calls=%lu last=%lu sum=%lu\n", stats_read(i, 2),
			stats_read(i, 3), stats_read(i, 0), stats_read(i, 4), stats_read(i, 1));
	for (i = 0; i < nr_cpus; i++)
		kprintf("[tk] cpu %u ticks=%lu syscalls=%lu\n", i, percpu[i].ticks, percpu[i].syscalls);
	debug_exit(0);
}

u64 syscall_dispatch(u64 a0, u64 a1, u64 a2, u64 nr)
{
	u32 cpu = (u32)this_cpu_read(16);
	struct percpu *pc = &percpu[cpu];

	(void)a2;
	pc->syscalls++;
	switch (nr) {
	case SYS_EXIT:
		kprintf("[tk] task %lu exit status=%lu iters=%lu\n", pc->task, a0, task_iters[pc->task]);
		if (__atomic_add_fetch(&tasks_done, 1, __ATOMIC_SEQ_CST) == opt_tasks)
			finish();
		cpu_idle();
	case SYS_WRITE: {
		if (a0 >= USER_STACK_TOP || a1 > 512)
			return (u64)-1;
		console_write((const char *)a0, a1);
		return a1;
	}
	case SYS_VERSION: {
		const char *v = lucos_version();
		u64 n = strlen(v);
		if (a0 >= USER_STACK_TOP || a1 == 0)
			return (u64)-1;
		if (n > a1 - 1)
			n = a1 - 1;
		memcpy((void *)a0, v, n);
		((char *)a0)[n] = 0;
		return n;
	}
	case SYS_COUNTER:
		return counter_next();
	case SYS_STATS:
		task_iters[pc->task] = a1;
		/* Two writers of the table: a patch that changes its layout
		 * and replaces one leaves the other writing the old copy. */
		if (a1 & 1)
			return stats_record((u32)a0, cpu, a1);
		return stats_update((u32)a0, cpu, a1);
	case SYS_OPS:
		return a1 ? ops_tally(a0) : ops_add(a0);
	case SYS_CTL:
		if (a0 == 3) {
			if (!tk_ctl_refresh_due())
				return 0;
			tk_ctls_register();
			return 1;
		}
		return a0 == 2 ? limits_charge(a2) : tk_ctl_access(a0, a1, a2);
	case SYS_STAT_READ:
		/* Reads the table through stats_read: unpatched, it reads the
		 * old copy after a live layout change, which lucos keeps coherent. */
		return stats_read((u32)a0, a1 == 4 ? 4 : a1 ? 1 : 0);
	case SYS_SPIN_CLI: {
		volatile u64 i;
		for (i = 0; i < a0; i++)
			;
		return a0;
	}
	case SYS_TICKS:
		return pc->ticks;
	case SYS_CPU:
		return cpu;
	case SYS_TRIPLE: {
		char marks[4] = "???";
		if (a0 >= USER_STACK_TOP - 4)
			return (u64)-1;
		tri_outer(marks, a1);
		memcpy((void *)a0, marks, 4);
		return 3;
	}
	case SYS_POKE:
		return text_poke_service(a0, a1);
	case SYS_PARAM:
		switch (a0) {
		case P_ITERS: return opt_iters;
		case P_REPORT: return opt_report;
		case P_MODE: return opt_mode;
		case P_SPIN: return opt_spin;
		case P_WORK: return opt_work;
		case P_ATOMIC_N: return opt_atomic_n;
		case P_TASKS: return opt_tasks;
		}
		return 0;
	}
	return (u64)-1;
}

void interrupt_dispatch(struct regs *r)
{
	if (r->vector == VEC_TIMER) {
		u64 cpu = this_cpu_read(16);
		percpu[cpu].ticks++;
		if (cpu == 0)
			jiffies++;
		wrmsr(MSR_X2APIC_EOI, 0);
		return;
	}
	if (r->vector == VEC_SPURIOUS)
		return;
	if (r->vector == 3 && (r->cs & 3)) {
		/* Kernel service through int3 (hosts where syscall cannot enter CPL0). */
		r->rax = syscall_dispatch(r->rdi, r->rsi, r->rdx, r->rax);
		return;
	}
	{
		u64 cr2;
		__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
		kprintf(KERN_EMERG "[tk] EXCEPTION vector=%lu error=%lx rip=%lx cs=%lx rsp=%lx cr2=%lx\n", r->vector,
			r->error, r->rip, r->cs, r->rsp, cr2);
	}
	panic("unexpected exception");
}

void kmain(u64 cpu, u64 boot_info_pa)
{
	if (cpu == 0) {
		const struct boot_info *bi = (const struct boot_info *)boot_info_pa; /* identity map */
		u32 a, b, c, d, have_1g, have_nx;
		u64 n;

		if (bi->magic != BOOT_INFO_MAGIC || bi->version != BOOT_INFO_VERSION)
			panic("bad boot_info");
		nr_cpus = bi->nr_cpus;
		boot_flags = bi->flags;
		mem_bytes = bi->mem_bytes;
		n = bi->cmdline_len < sizeof(cmdline) - 1 ? bi->cmdline_len : sizeof(cmdline) - 1;
		memcpy(cmdline, (const void *)bi->cmdline_gpa, n);
		cmdline[n] = 0;
		opt_tasks = nr_cpus;
		opt_report = 1000;
		opt_work = 2000;
		opt_spin = 20000;
		parse_cmdline();
		if (opt_tasks > nr_cpus)
			opt_tasks = nr_cpus;
		if (nr_cpus > MAX_CPUS)
			panic("too many cpus");
		kprintf("[tk] lucos test kernel, %s, cpus=%u mem=%luM cmdline='%s'\n", lucos_version(),
			nr_cpus, mem_bytes >> 20, cmdline);
		cpuid(0x80000001, 0, &a, &b, &c, &d);
		have_1g = (d >> 26) & 1;
		have_nx = (d >> 20) & 1;
		cpuid(1, 0, &a, &b, &c, &d);
		if (!(c & (1u << 21)))
			panic("CPU lacks x2APIC");
		build_page_tables((int)have_1g, (int)have_nx);
		build_idt();
		text_poke_init();
		__atomic_store_n(&smp_go, 1, __ATOMIC_RELEASE);
	} else {
		while (!__atomic_load_n(&smp_go, __ATOMIC_ACQUIRE))
			__asm__ volatile("pause");
	}

	cpu_init((u32)cpu);
	if (cpu == 0)
		/* Tell user code how to enter the kernel; the user image is mapped now. */
		user_service_trap = (boot_flags & BOOT_FLAG_NO_SYSCALL) ? 1 : 0;
	kprintf("[tk] cpu %lu online\n", cpu);
	__atomic_add_fetch(&cpus_online, 1, __ATOMIC_SEQ_CST);
	while (__atomic_load_n(&cpus_online, __ATOMIC_ACQUIRE) < nr_cpus)
		__asm__ volatile("pause");

	if (cpu == 0) {
		if (opt_selftest)
			selftest();
		kprintf("[tk] all %u cpus online, starting %lu tasks, services via %s\n", nr_cpus, opt_tasks,
			user_service_trap ? "int3" : "syscall");
	}
	if (cpu < opt_tasks) {
		percpu[cpu].task = cpu;
		enter_user((u64)user_main, user_stack_top(cpu), cpu);
	}
	cpu_idle();
}

/* SPDX-License-Identifier: Apache-2.0 */
/* Entry points: boot, interrupts/exceptions, syscall, and the first drop to user mode. */

#define KSTACK_SIZE 16384
#define USER_DS 0x2b
#define USER_CS 0x33

	.section .text.entry, "ax"
	.globl _start
_start:
	/* RDI = cpu index, RSI = boot_info physical address. Stack: boot_stacks[cpu]. */
	leaq boot_stacks(%rip), %rsp
	movq %rdi, %rax
	incq %rax
	shlq $14, %rax
	addq %rax, %rsp
	xorl %ebp, %ebp
	call kmain
1:	hlt
	jmp 1b

	.text
/* Interrupt and exception stubs: push a dummy error code where the CPU pushes none,
 * then the vector, then jump to the common path that builds a struct regs. */
.macro ISR_NOERR vec
	.globl isr\vec
isr\vec:
	pushq $0
	pushq $\vec
	jmp isr_common
.endm
.macro ISR_ERR vec
	.globl isr\vec
isr\vec:
	pushq $\vec
	jmp isr_common
.endm

ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
ISR_NOERR 3
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 6
ISR_NOERR 7
ISR_ERR 8
ISR_NOERR 9
ISR_ERR 10
ISR_ERR 11
ISR_ERR 12
ISR_ERR 13
ISR_ERR 14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR 17
ISR_NOERR 18
ISR_NOERR 19
ISR_NOERR 32
ISR_NOERR 36
ISR_NOERR 255

isr_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	call interrupt_dispatch
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp
	iretq

/* syscall: RCX = user RIP, R11 = user RFLAGS, RSP = user RSP, IF cleared by FMASK.
 * GS base always holds this CPU's struct percpu (user code never changes GS).
 * Returns to user mode with iretq (sysret is not used). */
	.globl syscall_entry
syscall_entry:
	movq %rsp, %gs:8
	movq %gs:0, %rsp
	pushq $USER_DS
	pushq %gs:8
	pushq %r11
	pushq $USER_CS
	pushq %rcx
	pushq %rbx
	pushq %rbp
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rax, %rcx
	call syscall_dispatch
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %rbp
	popq %rbx
	xorl %ecx, %ecx
	xorl %esi, %esi
	xorl %edi, %edi
	xorl %edx, %edx
	xorl %r8d, %r8d
	xorl %r9d, %r9d
	xorl %r10d, %r10d
	xorl %r11d, %r11d
	iretq

/* enter_user(rip, rsp, arg): first entry into a user task. */
	.globl enter_user
enter_user:
	pushq $USER_DS
	pushq %rsi
	pushq $0x202
	pushq $USER_CS
	pushq %rdi
	movq %rdx, %rdi
	xorl %eax, %eax
	xorl %ebx, %ebx
	xorl %ecx, %ecx
	xorl %edx, %edx
	xorl %esi, %esi
	xorl %ebp, %ebp
	xorl %r8d, %r8d
	xorl %r9d, %r9d
	xorl %r10d, %r10d
	xorl %r11d, %r11d
	xorl %r12d, %r12d
	xorl %r13d, %r13d
	xorl %r14d, %r14d
	xorl %r15d, %r15d
	iretq

/* load_segments(): reload CS/DS/SS after lgdt. */
	.globl load_segments
load_segments:
	movl $0x18, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	pushq $0x10
	leaq 1f(%rip), %rax
	pushq %rax
	lretq
1:	ret

	.bss
	.balign KSTACK_SIZE	/* aligned to their size, like Linux's THREAD_SIZE stacks */
	.globl boot_stacks
boot_stacks:
	.skip KSTACK_SIZE * 8

// SPDX-License-Identifier: Apache-2.0
/*
 * The kernel log: every line the console prints, kept as a record in a ring
 * laid out like Linux 6.1's printk ring buffer (include/printk.h), which the
 * VMM reads from outside (lucos dmesg). One writer at a time: log_store runs
 * under the console lock. Readers run concurrently (another process, on
 * another CPU) and take a record only when its descriptor's state_var is the
 * same after they copied it as before: so nothing a reader may be copying
 * is overwritten before its descriptor leaves the finalized state.
 */
#include "printk.h"

#define DESC_BITS 7  /* 128 records */
#define TEXT_BITS 14 /* 16 KiB of text */
#define DESC_COUNT (1UL << DESC_BITS)
#define TEXT_SIZE (1UL << TEXT_BITS)
#define STATE_SHIFT 62
#define ID_MASK ((1UL << STATE_SHIFT) - 1)
#define NO_TEXT 3UL /* an lpos with bit 0 set: a record without text */

/*
 * Ids start just below the 62-bit wrap and positions one ring below the
 * 64-bit wrap, so a reader meets both wraps within the first few hundred
 * lines. ZERO_ID is a placeholder descriptor (reusable, no text) that head
 * and tail point at while the log is empty; the first record gets the id
 * after it, at index 0.
 */
#define FIRST_ID ((0UL - DESC_COUNT) & ID_MASK)
#define ZERO_ID ((FIRST_ID - 1) & ID_MASK)
#define FIRST_LPOS (0UL - TEXT_SIZE)

static struct prb_desc log_descs[DESC_COUNT] = {
	[DESC_COUNT - 1] = {
		.state_var = { (s64)(ZERO_ID | ((u64)desc_reusable << STATE_SHIFT)) },
		.text_blk_lpos = { NO_TEXT, NO_TEXT },
	},
};
static struct printk_info log_infos[DESC_COUNT];
static char log_text[TEXT_SIZE] __attribute__((aligned(8)));

struct printk_ringbuffer printk_rb_static = {
	.desc_ring = {
		.count_bits = DESC_BITS,
		.descs = log_descs,
		.infos = log_infos,
		.head_id = { (s64)ZERO_ID },
		.tail_id = { (s64)ZERO_ID },
		.last_finalized_id = { (s64)ZERO_ID },
	},
	.text_data_ring = {
		.size_bits = TEXT_BITS,
		.data = log_text,
		.head_lpos = { (s64)FIRST_LPOS },
		.tail_lpos = { (s64)FIRST_LPOS },
	},
};
struct printk_ringbuffer *prb = &printk_rb_static;

/* Sequence number of the next record (the first is 0). */
static u64 log_next_seq;

static inline u64 lpos_index(u64 lpos)
{
	return lpos & (TEXT_SIZE - 1);
}

static inline u64 lpos_wrap(u64 lpos)
{
	return lpos >> TEXT_BITS;
}

static inline void store_release(atomic_long_t *v, u64 value)
{
	__atomic_store_n(&v->counter, (s64)value, __ATOMIC_RELEASE);
	/* Nor may later stores (the text or slot this frees) move above it.
	 * The CPU keeps stores in order (x86); this keeps the compiler so. */
	__asm__ volatile("" ::: "memory");
}

static inline void set_state(struct prb_desc *d, u64 id, enum desc_state state)
{
	store_release(&d->state_var, id | ((u64)state << STATE_SHIFT));
}

/* The log's bookkeeping contradicts itself: say so without the console lock
 * (the caller holds it) and stop. */
static __attribute__((noreturn)) void log_broken(const char *why)
{
	puts_raw("[tk] PANIC: kernel log: ");
	puts_raw(why);
	puts_raw("\n");
	debug_exit(0x7f);
}

/* Moves the text ring's tail to `lpos` at least: every block it passes no
 * longer belongs to its record, which becomes reusable first. */
static void push_text_tail(u64 lpos)
{
	struct prb_data_ring *tr = &prb->text_data_ring;
	struct prb_desc_ring *dr = &prb->desc_ring;
	u64 tail = (u64)tr->tail_lpos.counter;

	while ((s64)(lpos - tail) > 0) {
		const struct prb_data_block *b = (const void *)(tr->data + lpos_index(tail));
		u64 id = b->id;
		struct prb_desc *d = &dr->descs[id & (DESC_COUNT - 1)];
		u64 sv = (u64)d->state_var.counter;

		if ((sv & ID_MASK) != id || d->text_blk_lpos.begin != tail)
			log_broken("a text block's descriptor does not own it");
		if (sv >> STATE_SHIFT != desc_reusable)
			set_state(d, id, desc_reusable);
		tail = d->text_blk_lpos.next;
		store_release(&tr->tail_lpos, tail);
	}
}

/* Frees the oldest descriptor (the ring is full): its text, if still in the
 * text ring, goes first. */
static void retire_oldest(void)
{
	struct prb_desc_ring *dr = &prb->desc_ring;
	u64 id = (u64)dr->tail_id.counter;
	struct prb_desc *d = &dr->descs[id & (DESC_COUNT - 1)];

	if ((u64)d->state_var.counter >> STATE_SHIFT != desc_reusable) {
		if (d->text_blk_lpos.begin & 1)
			set_state(d, id, desc_reusable);
		else
			push_text_tail(d->text_blk_lpos.next);
	}
	store_release(&dr->tail_id, (id + 1) & ID_MASK);
}

void log_store(u8 facility, u8 level, const char *text, u16 len)
{
	struct prb_desc_ring *dr = &prb->desc_ring;
	struct prb_data_ring *tr = &prb->text_data_ring;
	u64 id = ((u64)dr->head_id.counter + 1) & ID_MASK;
	u64 slot = id & (DESC_COUNT - 1);
	struct prb_desc *d = &dr->descs[slot];
	struct printk_info *info = &dr->infos[slot];
	u64 begin = NO_TEXT, next = NO_TEXT;

	/* The slot holds id - count: while that is the tail, it goes first. */
	if (((id - (u64)dr->tail_id.counter) & ID_MASK) >= DESC_COUNT)
		retire_oldest();
	if (len) {
		u64 size = (sizeof(struct prb_data_block) + len + 7) & ~7UL;

		begin = (u64)tr->head_lpos.counter;
		next = begin + size;
		/* A block that would reach the end of the ring goes to index 0. */
		if (lpos_wrap(begin) != lpos_wrap(next))
			next = (next & ~(TEXT_SIZE - 1)) + size;
		push_text_tail(next - TEXT_SIZE);
	}

	set_state(d, id, desc_reserved);
	store_release(&dr->head_id, id);
	if (len) {
		struct prb_data_block *b = (void *)(tr->data + lpos_index(begin));

		b->id = id;
		if (lpos_wrap(begin) != lpos_wrap(next)) {
			b = (void *)tr->data;
			b->id = id;
		}
		memcpy(b->data, text, len);
		store_release(&tr->head_lpos, next);
	}
	d->text_blk_lpos.begin = begin;
	d->text_blk_lpos.next = next;
	memset(info, 0, sizeof(*info));
	info->seq = log_next_seq++;
	info->ts_nsec = jiffies * tick_ns;
	info->text_len = len;
	info->facility = facility;
	info->level = level & 7;
	set_state(d, id, desc_finalized);
	store_release(&dr->last_finalized_id, id);
}

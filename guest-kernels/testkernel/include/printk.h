/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The kernel log, kept in the layout of Linux 6.1's printk ring buffer: the
 * same struct and member names and member types, so that one reader outside
 * the guest (lucos dmesg, which takes every offset from the kernel's type
 * information) serves both kernels.
 *
 * Two rings. Descriptors (a power of two of them) are addressed by id: the
 * low 62 bits of a descriptor's state_var are its id, the top 2 its state;
 * descriptor `id` lives at index id & (count - 1), next to its printk_info.
 * Text lives in a data ring addressed by logical positions (lpos): index =
 * lpos & (size - 1), wrap = lpos >> size_bits. A data block is the id of its
 * descriptor followed by the text, 8-byte aligned; a block that would reach
 * the end of the ring is put at index 0 instead (its begin stays where it
 * would have started, its next counts from index 0 of the next wrap, and the
 * id is written at both places). A begin with bit 0 set is a record without
 * text.
 */
#ifndef PRINTK_H
#define PRINTK_H

#include "tk.h"

typedef struct {
	s64 counter;
} atomic64_t;
typedef atomic64_t atomic_long_t;

struct prb_data_blk_lpos {
	unsigned long begin;
	unsigned long next;
};

struct prb_desc {
	atomic_long_t state_var;
	struct prb_data_blk_lpos text_blk_lpos;
};

struct prb_data_ring {
	unsigned int size_bits;
	char *data;
	atomic_long_t head_lpos;
	atomic_long_t tail_lpos;
};

struct printk_info;

struct prb_desc_ring {
	unsigned int count_bits;
	struct prb_desc *descs;
	struct printk_info *infos;
	atomic_long_t head_id;
	atomic_long_t tail_id;
	atomic_long_t last_finalized_id;
};

struct printk_ringbuffer {
	struct prb_desc_ring desc_ring;
	struct prb_data_ring text_data_ring;
	atomic_long_t fail;
};

struct dev_printk_info {
	char subsystem[16];
	char device[48];
};

struct printk_info {
	u64 seq;
	u64 ts_nsec;
	u16 text_len;
	u8 facility;
	u8 flags : 5;
	u8 level : 3;
	u32 caller_id;
	struct dev_printk_info dev_info;
};

struct prb_data_block {
	unsigned long id;
	char data[];
};

/* Descriptor states, in the top 2 bits of state_var. */
enum desc_state {
	desc_reserved = 0,  /* being written */
	desc_committed = 1, /* written, may still be extended (not used here) */
	desc_finalized = 2, /* complete: readers take it */
	desc_reusable = 3,  /* its text is gone (overwritten or about to be) */
};

/* The ring the kernel logs to. */
extern struct printk_ringbuffer *prb;

/* Appends one record (the console lock held). */
void log_store(u8 facility, u8 level, const char *text, u16 len);

#endif

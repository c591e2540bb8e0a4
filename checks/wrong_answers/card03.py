"""card03's plausible wrong answers, each with the tests written to catch it (checks/test_alternatives.py)."""

from wrong_answers import Wrong

SOLUTION = "solutions/card03_paging/paging.py"

STATIC = "test_static_slot_waste_is_the_share_of_a_reserved_cache_never_written"
BOUND = "test_reservation_waste_bound_is_what_the_fullest_matching_trace_wastes"
FLOOR = "test_reservation_waste_bound_is_never_above_a_trace_that_matches_the_facts"
BLOCKS = "test_blocks_for_tokens_are_the_blocks_kvrefs_allocator_holds"
TABLE = "test_paged_table_kata_keeps_the_invariants_through_random_allocate_append_free"
TABLE_70 = "test_paged_table_kata_worked_example_70_tokens_in_blocks_of_16"
TABLE_COPY = "test_paged_table_kata_returns_tables_the_caller_may_change_without_touching_the_allocator"
TABLE_REFUSED = "test_paged_table_kata_refused_append_changes_nothing_and_append_works_after_a_free"
TABLE_FREED = "test_paged_table_kata_forgets_a_freed_sequence_and_can_allocate_its_id_again"
PAGED = "test_paged_slot_waste_is_what_kvrefs_allocator_leaves_empty_in_its_blocks"
PAGED_TRACE = "test_paged_slot_waste_on_a_long_tailed_trace_is_under_4_percent_where_static_wastes_most"
BYTES = "test_paged_waste_bytes_are_the_empty_slots_of_kvrefs_blocks_in_every_layer"

STATIC_RET = "return 1 - sum(lengths) / (len(lengths) * max_seq_len)"
USED = "used = short_fraction * short_max + (1 - short_fraction) * max_seq_len"
CEIL = "return -(-n_tokens // block_size)"
NEED = "need = blocks_for_tokens(n_tokens, self.block_size)"
BOUNDARY = "if pos % self.block_size == 0:"
SLOT = "return table[pos // self.block_size] * self.block_size + pos % self.block_size"
HELD = "held = sum(blocks_for_tokens(n, block_size) for n in lengths) * block_size"
UNUSED = "unused = sum(blocks_for_tokens(n, block_size) * block_size - n for n in lengths)"
PER_SLOT = "return unused * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize"

WRONG = [
    # --- static_slot_waste ---------------------------------------------------------------------------
    Wrong("static-the-used-share", STATIC_RET, "return sum(lengths) / (len(lengths) * max_seq_len)", (STATIC,)),
    Wrong("static-reserves-the-longest-request", STATIC_RET, "return 1 - sum(lengths) / (len(lengths) * max(lengths))", (STATIC,)),  # pinned: TRACE at 2,048
    Wrong("static-floor-division", STATIC_RET, "return 1 - sum(lengths) // (len(lengths) * max_seq_len)", (STATIC,)),
    Wrong("static-unused-slots-per-request", STATIC_RET, "return max_seq_len - sum(lengths) / len(lengths)", (STATIC,)),
    Wrong("static-over-the-used-slots", STATIC_RET,
          "return (len(lengths) * max_seq_len - sum(lengths)) / sum(lengths)", (STATIC,)),
    Wrong("static-median-request", STATIC_RET,
          "return 1 - sorted(lengths)[len(lengths) // 2] / max_seq_len", (STATIC,)),
    # --- reservation_waste_bound ---------------------------------------------------------------------
    Wrong("bound-short-requests-empty", USED, "used = (1 - short_fraction) * max_seq_len", (BOUND, FLOOR)),
    Wrong("bound-uniform-lengths", USED, "used = short_fraction * short_max / 2 + (1 - short_fraction) * max_seq_len / 2",
          (BOUND,)),
    Wrong("bound-uniform-short-requests", USED, "used = short_fraction * short_max / 2 + (1 - short_fraction) * max_seq_len",
          (BOUND,)),
    Wrong("bound-ignores-the-fraction", USED, "used = short_max", (BOUND,)),
    Wrong("bound-the-short-requests-alone", "return 1 - used / max_seq_len", "return 1 - short_max / max_seq_len",
          (BOUND,)),
    Wrong("bound-long-requests-half-full", USED, "used = short_fraction * short_max + (1 - short_fraction) * max_seq_len / 2",
          (BOUND,)),
    # --- blocks_for_tokens ---------------------------------------------------------------------------
    Wrong("blocks-floor", CEIL, "return n_tokens // block_size", (BLOCKS,)),
    Wrong("blocks-floor-plus-one", CEIL, "return n_tokens // block_size + 1", (BLOCKS,)),
    Wrong("blocks-one-too-many-when-full", CEIL, "return (n_tokens + block_size) // block_size", (BLOCKS,)),
    Wrong("blocks-at-least-one", CEIL, "return max(1, -(-n_tokens // block_size))", (BLOCKS,)),
    Wrong("blocks-rounded", CEIL, "return round(n_tokens / block_size)", (BLOCKS,)),
    Wrong("blocks-a-float", CEIL, "return -(-n_tokens / block_size) // 1 * -1", (BLOCKS,)),
    # --- PagedBlockTable -----------------------------------------------------------------------------
    Wrong("table-free-leaks-the-blocks", "self.free_blocks.extend(self.tables.pop(seq_id))", "self.tables.pop(seq_id)",
          (TABLE, TABLE_70, TABLE_REFUSED, TABLE_FREED)),
    Wrong("table-allocate-floors-the-blocks", NEED, "need = n_tokens // self.block_size", (TABLE, TABLE_70)),
    Wrong("table-refused-allocate-leaves-an-empty-table",
          "        need = blocks_for_tokens(n_tokens, self.block_size)\n        if need",
          "        need = blocks_for_tokens(n_tokens, self.block_size)\n        self.tables[seq_id] = []\n        if need",
          (TABLE_70,)),
    Wrong("table-allocate-refuses-an-exact-fit", "if need > len(self.free_blocks):", "if need >= len(self.free_blocks):",
          (TABLE_70,)),
    Wrong("table-allocate-takes-blocks-before-the-check",
          "        if need > len(self.free_blocks):\n            raise MemoryError(f\"{need} blocks needed, {len(self.free_blocks)} free\")\n"
          "        self.tables[seq_id] = [self.free_blocks.pop() for _ in range(need)]",
          "        self.tables[seq_id] = [self.free_blocks.pop() for _ in range(min(need, len(self.free_blocks)))]\n"
          "        if len(self.tables[seq_id]) < need:\n            raise MemoryError(\"out of blocks\")",
          (TABLE_70,)),
    Wrong("table-new-block-when-the-next-is-a-boundary", BOUNDARY, "if (pos + 1) % self.block_size == 0:",
          (TABLE, TABLE_REFUSED)),
    Wrong("table-append-slot-is-the-position", SLOT, "return pos", (TABLE_70, TABLE_COPY, TABLE_REFUSED)),
    Wrong("table-append-slot-of-the-next-position", SLOT,
          "return table[pos // self.block_size] * self.block_size + (pos + 1) % self.block_size", (TABLE_70, TABLE_COPY)),
    Wrong("table-append-slot-block-plus-position", SLOT, "return table[pos // self.block_size] * self.block_size + pos",
          (TABLE_70, TABLE_COPY, TABLE_REFUSED)),
    Wrong("table-append-slot-block-id-only", SLOT, "return table[pos // self.block_size]", (TABLE_70, TABLE_COPY, TABLE_REFUSED)),
    Wrong("table-append-counts-before-the-check", "        pos, table = self.lengths[seq_id], self.tables[seq_id]\n",
          "        pos, table = self.lengths[seq_id], self.tables[seq_id]\n        self.lengths[seq_id] = pos + 1\n",
          (TABLE_REFUSED,)),
    Wrong("table-append-without-a-memory-check", "            if not self.free_blocks:\n                raise MemoryError(\"no free block\")\n",
          "", (TABLE_REFUSED,)),
    Wrong("table-block_table-returns-its-own-list", "return list(self.tables[seq_id])\n\n    def allocate",
          "return self.tables[seq_id]\n\n    def allocate",
          (TABLE_COPY,)),
    Wrong("table-allocate-returns-its-own-list", "return list(self.tables[seq_id])\n\n    def append",
          "return self.tables[seq_id]\n\n    def append", (TABLE_COPY,)),
    Wrong("table-free-keeps-the-table", "self.free_blocks.extend(self.tables.pop(seq_id))",
          "self.free_blocks.extend(self.tables[seq_id])", (TABLE_FREED,)),
    Wrong("table-block-ids-from-one", "self.free_blocks = list(range(num_blocks))",
          "self.free_blocks = list(range(1, num_blocks + 1))", (TABLE, TABLE_FREED)),
    # --- paged_slot_waste ----------------------------------------------------------------------------
    Wrong("paged-floor-blocks", HELD, "held = sum(n // block_size for n in lengths) * block_size", (PAGED, PAGED_TRACE)),
    Wrong("paged-blocks-pooled-over-the-trace", HELD, "held = blocks_for_tokens(sum(lengths), block_size) * block_size",
          (PAGED, PAGED_TRACE)),
    Wrong("paged-mean-of-per-request-fractions", "return 1 - sum(lengths) / held",
          "return sum(1 - n / (blocks_for_tokens(n, block_size) * block_size) for n in lengths) / len(lengths)",
          (PAGED, PAGED_TRACE)),
    Wrong("paged-over-the-used-slots", "return 1 - sum(lengths) / held", "return (held - sum(lengths)) / sum(lengths)",
          (PAGED, PAGED_TRACE)),
    Wrong("paged-worst-case-bound", "return 1 - sum(lengths) / held", "return (block_size - 1) / block_size",
          (PAGED, PAGED_TRACE)),
    Wrong("paged-a-full-block-wasted-when-full", HELD,
          "held = sum(n + block_size - n % block_size for n in lengths)", (PAGED,)),
    # --- paged_waste_bytes ---------------------------------------------------------------------------
    Wrong("bytes-k-only", PER_SLOT, PER_SLOT.replace("unused * 2 *", "unused *"), (BYTES,)),
    Wrong("bytes-with-n_heads", PER_SLOT, PER_SLOT.replace("cfg.n_kv_heads", "cfg.n_heads"), (BYTES,)),
    Wrong("bytes-of-one-layer", PER_SLOT, PER_SLOT.replace("cfg.n_layers * ", ""), (BYTES,)),
    Wrong("bytes-in-bits", PER_SLOT, PER_SLOT.replace("dtype.itemsize", "torch.finfo(dtype).bits"), (BYTES,)),
    Wrong("bytes-d_model-for-kv-heads-times-head-dim", PER_SLOT, PER_SLOT.replace("cfg.n_kv_heads * cfg.head_dim", "cfg.d_model"),
          (BYTES,)),
    Wrong("bytes-unused-as-the-last-block-s-fill", UNUSED, "unused = sum(n % block_size for n in lengths)", (BYTES,)),
    Wrong("bytes-unused-a-whole-block-when-full", UNUSED, "unused = sum(block_size - n % block_size for n in lengths)", (BYTES,)),
    Wrong("bytes-a-float-from-the-waste-fraction", UNUSED,
          "unused = paged_slot_waste(lengths, block_size) * sum(blocks_for_tokens(n, block_size) * block_size for n in lengths)",
          (BYTES,)),
    Wrong('blocks-round-half',
          'return -(-n_tokens // block_size)',
          'return round(n_tokens / block_size + 0.5)',
          ('test_blocks_for_tokens_are_the_blocks_kvrefs_allocator_holds', 'test_paged_slot_waste_is_what_kvrefs_allocator_leaves_empty_in_its_blocks')),
    Wrong('blocks-int-plus-half',
          'return -(-n_tokens // block_size)',
          'return int(n_tokens / block_size + 0.5)',
          ('test_blocks_for_tokens_are_the_blocks_kvrefs_allocator_holds', 'test_paged_slot_waste_is_what_kvrefs_allocator_leaves_empty_in_its_blocks')),
    Wrong('bytes-bf16-assumed',
          'cfg.head_dim * dtype.itemsize',
          'cfg.head_dim * 2',
          ('test_paged_waste_bytes_are_the_empty_slots_of_kvrefs_blocks_in_every_layer',)),
    Wrong('bytes-head-dim-from-d_model',
          'cfg.n_kv_heads * cfg.head_dim * dtype.itemsize',
          'cfg.n_kv_heads * (cfg.d_model // cfg.n_heads) * dtype.itemsize',
          ('test_paged_waste_bytes_are_the_empty_slots_of_kvrefs_blocks_in_every_layer',)),
    Wrong('bytes-whole-blocks-of-waste',
          'unused = sum(blocks_for_tokens(n, block_size) * block_size - n for n in lengths)',
          'unused = sum(block_size - n % block_size for n in lengths)',
          ('test_paged_waste_bytes_are_the_empty_slots_of_kvrefs_blocks_in_every_layer',)),
    Wrong('bytes-pooled-blocks',
          'unused = sum(blocks_for_tokens(n, block_size) * block_size - n for n in lengths)',
          'unused = blocks_for_tokens(sum(lengths), block_size) * block_size - sum(lengths)',
          ('test_paged_waste_bytes_are_the_empty_slots_of_kvrefs_blocks_in_every_layer',)),
    Wrong('static-int-division',
          'return 1 - sum(lengths) / (len(lengths) * max_seq_len)',
          'return (len(lengths) * max_seq_len - sum(lengths)) // (len(lengths) * max_seq_len)',
          ('test_static_slot_waste_is_the_share_of_a_reserved_cache_never_written',)),
    Wrong('static-percent',
          'return 1 - sum(lengths) / (len(lengths) * max_seq_len)',
          'return 100 * (1 - sum(lengths) / (len(lengths) * max_seq_len))',
          ('test_static_slot_waste_is_the_share_of_a_reserved_cache_never_written',)),
    Wrong('bound-short-max-minus-one',
          'used = short_fraction * short_max',
          'used = short_fraction * (short_max - 1)',
          ('test_reservation_waste_bound_is_what_the_fullest_matching_trace_wastes',)),
    Wrong('table-append-no-boundary-for-block-size-1',
          'if pos % self.block_size == 0:',
          'if pos % self.block_size == 0 and self.block_size > 1 or pos == 0:',
          ('test_paged_table_kata_keeps_the_invariants_through_random_allocate_append_free',)),
    Wrong('table-allocate-counts-tokens',
          'self.lengths[seq_id] = n_tokens',
          'self.lengths[seq_id] = len(self.tables[seq_id]) * self.block_size',
          ('test_paged_table_kata_keeps_the_invariants_through_random_allocate_append_free', 'test_paged_table_kata_returns_tables_the_caller_may_change_without_touching_the_allocator')),
    Wrong('table-free-list-shared',
          'return list(self.tables[seq_id])\n\n    def allocate',
          'return self.tables[seq_id]\n\n    def allocate',
          ('test_paged_table_kata_refused_append_changes_nothing_and_append_works_after_a_free', 'test_paged_table_kata_returns_tables_the_caller_may_change_without_touching_the_allocator')),
    Wrong('paged-mean-over-requests',
          '    held = sum(blocks_for_tokens(n, block_size) for n in lengths) * block_size\n    return 1 - sum(lengths) / held',
          '    return sum(1 - n / (blocks_for_tokens(n, block_size) * block_size) for n in lengths) / len(lengths)',
          ('test_paged_slot_waste_is_what_kvrefs_allocator_leaves_empty_in_its_blocks', 'test_paged_slot_waste_on_a_long_tailed_trace_is_under_4_percent_where_static_wastes_most')),
    Wrong('paged-half-block-average',
          '    held = sum(blocks_for_tokens(n, block_size) for n in lengths) * block_size\n    return 1 - sum(lengths) / held',
          '    return len(lengths) * (block_size - 1) / 2 / (sum(lengths) + len(lengths) * (block_size - 1) / 2)',
          ('test_paged_slot_waste_is_what_kvrefs_allocator_leaves_empty_in_its_blocks', 'test_paged_slot_waste_on_a_long_tailed_trace_is_under_4_percent_where_static_wastes_most')),
]

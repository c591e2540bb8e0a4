"""card05's plausible wrong answers, each with the tests written to catch it (checks/test_alternatives.py)."""

from wrong_answers import Wrong

SOLUTION = "solutions/card05_batching/batching.py"

BATCH = ("test_max_batch_from_memory_matches_nbytes_of_kvrefs_static_caches",
         "test_max_batch_from_memory_of_real_presets_counts_layers_and_kv_heads",
         "test_max_batch_from_memory_fills_memory_with_real_caches_of_a_small_model")
RATIO = ("test_layers_doubled_throughput_ratio_matches_the_serving_simulator",
         "test_layers_doubled_throughput_ratio_of_small_models_matches_the_serving_simulator",
         "test_layers_doubled_throughput_ratio_when_weight_reads_dominate")
ISOLATION = ("test_continuous_batching_step_gives_each_request_the_tokens_it_gets_alone",)
LIMITS = ("test_continuous_batching_step_keeps_the_batch_and_the_cache_within_their_limits",)
EXACT = ("test_continuous_batching_step_admits_a_request_whose_whole_cache_fits_the_budget_exactly",)
RETIRE = ("test_continuous_batching_step_retires_each_request_at_its_last_token_in_arrival_order",)

PER_TOKEN = "per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize  # K and V, every layer"
BATCH_RETURN = "return free_bytes // (seq_len * per_token)"
ATTN = "attn = 2 * c.d_model * c.n_heads * c.head_dim + 2 * c.d_model * c.n_kv_heads * c.head_dim"
WEIGHTS = "weights = c.n_layers * (attn + mlp) + c.d_model * c.vocab_size"
FLOPS = "flops = 2 * batch * weights + 4 * c.n_layers * batch * c.n_heads * (seq_len + 1) * c.head_dim"
KV = "kv = batch * (seq_len + 1) * 2 * c.n_layers * c.n_kv_heads * c.head_dim * dtype.itemsize"
TIME = "time = max(flops / hw.peak_flops(dtype), (weights * dtype.itemsize + kv) / hw.mem_bandwidth)"
ADMIT_BATCH = "batch = max_batch_from_memory(c, free_bytes, seq_len + 1, dtype)"
RATIO_RETURN = "return tokens_per_s(cfg.with_(n_layers=2 * cfg.n_layers)) / tokens_per_s(cfg)"
NEED = "need = len(waiting[0].prompt) + waiting[0].max_new_tokens - 1  # the last token is never fed back"
RESERVED = "reserved = sum(len(r.prompt) + r.max_new_tokens - 1 for r in running)"
ADMIT = """        if reserved + need > kv_budget_tokens:
            break  # first come, first served: the head waits, and so does everyone behind it
        reserved += need
        running.append(waiting.pop(0))"""
FINISHED = "finished = [r for r in running if len(r.output) >= r.max_new_tokens]"
KEEP = "running[:] = [r for r in running if len(r.output) < r.max_new_tokens]"
ADMISSION_LOOP = """    while waiting and len(running) < max_batch:
        need = len(waiting[0].prompt) + waiting[0].max_new_tokens - 1  # the last token is never fed back
        if reserved + need > kv_budget_tokens:
            break  # first come, first served: the head waits, and so does everyone behind it
        reserved += need
        running.append(waiting.pop(0))
"""

WRONG = [
    # max_batch_from_memory
    Wrong("batch-K-and-V-counted-once", PER_TOKEN, PER_TOKEN.replace("2 * cfg", "cfg"), BATCH),
    Wrong("batch-n_heads-for-n_kv_heads", PER_TOKEN, PER_TOKEN.replace("n_kv_heads", "n_heads"), BATCH),
    Wrong("batch-d_model-as-the-source-card-says", PER_TOKEN,
          PER_TOKEN.replace("cfg.n_kv_heads * cfg.head_dim", "cfg.d_model"), BATCH),
    Wrong("batch-one-layer", PER_TOKEN, PER_TOKEN.replace("cfg.n_layers * ", ""), BATCH),
    Wrong("batch-tokens-not-sequences", BATCH_RETURN, "return free_bytes // per_token", BATCH),
    Wrong("batch-ceil-for-floor", BATCH_RETURN, "return -(-free_bytes // (seq_len * per_token))", BATCH),
    Wrong("batch-a-float", BATCH_RETURN, "return free_bytes / (seq_len * per_token)", BATCH),
    Wrong("batch-2-bytes-whatever-the-dtype", PER_TOKEN, PER_TOKEN.replace("dtype.itemsize", "2"),
          BATCH[:2]),
    Wrong("batch-room-for-one-more-position", BATCH_RETURN, "return free_bytes // ((seq_len + 1) * per_token)", BATCH[:2]),
    # layers_doubled_throughput_ratio
    Wrong("ratio-a-half-recalled", RATIO_RETURN, "return 0.5", RATIO),
    Wrong("ratio-inverted", RATIO_RETURN,
          "return tokens_per_s(cfg) / tokens_per_s(cfg.with_(n_layers=2 * cfg.n_layers))", RATIO),
    Wrong("ratio-batch-of-seq_len-positions", ADMIT_BATCH, "batch = max_batch_from_memory(c, free_bytes, seq_len, dtype)",
          RATIO[:2]),
    Wrong("ratio-batch-of-the-shallow-model-for-both", ADMIT_BATCH,
          "batch = max_batch_from_memory(cfg, free_bytes, seq_len + 1, dtype)", RATIO),
    Wrong("ratio-weights-not-read", TIME, "time = max(flops / hw.peak_flops(dtype), kv / hw.mem_bandwidth)", RATIO),
    Wrong("ratio-sum-where-a-max-belongs", TIME,
          "time = flops / hw.peak_flops(dtype) + (weights * dtype.itemsize + kv) / hw.mem_bandwidth", RATIO),
    Wrong("ratio-steps-per-second-not-tokens", "return batch / time", "return 1 / time", RATIO),
    Wrong("ratio-lm_head-forgotten", WEIGHTS, "weights = c.n_layers * (attn + mlp)", RATIO),
    Wrong("ratio-lm_head-in-every-layer", WEIGHTS, "weights = c.n_layers * (attn + mlp + c.d_model * c.vocab_size)",
          RATIO),
    Wrong("ratio-k-and-v-weights-of-n_heads", ATTN, "attn = 4 * c.d_model * c.n_heads * c.head_dim", RATIO[:2]),
    Wrong("ratio-q-and-o-weights-of-n_kv_heads", ATTN, "attn = 4 * c.d_model * c.n_kv_heads * c.head_dim", RATIO[:2]),
    Wrong("ratio-swiglu-mlp-always", "mlp = (3 if c.mlp == \"swiglu\" else 2) * c.d_model * c.d_ff",
          "mlp = 3 * c.d_model * c.d_ff", RATIO[:1]),
    Wrong("ratio-one-flop-per-weight", FLOPS, FLOPS.replace("2 * batch * weights", "batch * weights"), RATIO[:2]),
    Wrong("ratio-attention-flops-of-n_kv_heads", FLOPS, FLOPS.replace("c.n_heads", "c.n_kv_heads"), RATIO[:2]),
    Wrong("ratio-attention-flops-forgotten", FLOPS, "flops = 2 * batch * weights", RATIO[:2]),
    Wrong("ratio-cache-read-of-seq_len-positions", KV, KV.replace("(seq_len + 1)", "seq_len"), RATIO),
    Wrong("ratio-cache-read-without-the-batch", KV, KV.replace("batch * ", ""), RATIO),
    Wrong("ratio-batch-not-floored", ADMIT_BATCH,
          "batch = free_bytes / ((seq_len + 1) * 2 * c.n_layers * c.n_kv_heads * c.head_dim * dtype.itemsize)", RATIO[:2]),
    Wrong("ratio-memory-bound-always", TIME, "time = (weights * dtype.itemsize + kv) / hw.mem_bandwidth", RATIO[:2]),
    Wrong("ratio-compute-bound-always", TIME, "time = flops / hw.peak_flops(dtype)", RATIO),
    Wrong("ratio-peak-of-float32-whatever-the-dtype", TIME, TIME.replace("hw.peak_flops(dtype)", "hw.peak_flops(torch.float32)"),
          RATIO[:2]),
    # continuous_batching_step
    Wrong("admit-reserves-prompt-plus-max_new_tokens", NEED,
          "need = len(waiting[0].prompt) + waiting[0].max_new_tokens", EXACT),
    Wrong("admit-running-reserve-prompt-plus-max_new_tokens", RESERVED,
          "reserved = sum(len(r.prompt) + r.max_new_tokens for r in running)", EXACT),
    Wrong("admit-counts-only-what-running-caches-hold-now", RESERVED,
          "reserved = sum(len(r.prompt) + len(r.output) for r in running)", LIMITS),
    Wrong("admit-ignores-the-running-requests", RESERVED, "reserved = 0", LIMITS),
    Wrong("admit-the-head-fits-alone", "if reserved + need > kv_budget_tokens:", "if need > kv_budget_tokens:", LIMITS),
    Wrong("admit-lets-a-later-request-overtake", ADMIT,
          """        fits = [r for r in waiting if reserved + len(r.prompt) + r.max_new_tokens - 1 <= kv_budget_tokens]
        if not fits:
            break
        reserved += len(fits[0].prompt) + fits[0].max_new_tokens - 1
        running.append(fits[0])
        waiting.remove(fits[0])""", LIMITS),
    Wrong("admit-last-come-first-served", "running.append(waiting.pop(0))", "running.append(waiting.pop())",
          LIMITS + RETIRE),
    Wrong("admit-joins-at-the-front", "running.append(waiting.pop(0))", "running.insert(0, waiting.pop(0))", RETIRE),
    Wrong("admit-one-over-max_batch", "while waiting and len(running) < max_batch:",
          "while waiting and len(running) <= max_batch:", LIMITS),
    Wrong("admit-a-budget-exactly-full-refused", "if reserved + need > kv_budget_tokens:",
          "if reserved + need >= kv_budget_tokens:", EXACT),
    Wrong("admit-one-request-a-step", "        running.append(waiting.pop(0))\n",
          "        running.append(waiting.pop(0))\n        break\n", LIMITS),
    Wrong("admit-after-the-step", ADMISSION_LOOP + "    if not running:\n        return []\n",
          "    if not running:\n        " + ADMISSION_LOOP.strip().replace("\n", "\n        ") + "\n"
          "    if not running:\n        return []\n", LIMITS),
    Wrong("token-kept-as-a-tensor", "r.output.append(int(row.argmax()))", "r.output.append(row.argmax())",
          ISOLATION + RETIRE),
    Wrong("token-from-the-first-row", "for r, row in zip(running, logits):",
          "for r, row in zip(running, logits[:1].expand_as(logits)):", ISOLATION + RETIRE),
    Wrong("retire-one-step-late", FINISHED + "\n    " + KEEP,
          FINISHED.replace(">=", ">") + "\n    " + KEEP.replace("<", "<="), RETIRE),
    Wrong("retire-returns-in-reverse-order", "    return finished\n", "    return finished[::-1]\n", RETIRE),
    Wrong("retire-only-the-first-to-finish", FINISHED, FINISHED.replace("finished = [", "finished = [") + "[:1]",
          RETIRE),
    Wrong('batch-gb',
          'return free_bytes // (seq_len * per_token)',
          'return int(free_bytes / 1e9 * 2**30) // (seq_len * per_token)',
          ('test_layers_doubled_throughput_ratio_matches_the_serving_simulator', 'test_layers_doubled_throughput_ratio_of_small_models_matches_the_serving_simulator')),
    Wrong('step-admit-by-current-length',
          'need = len(waiting[0].prompt) + waiting[0].max_new_tokens - 1',
          'need = len(waiting[0].prompt)',
          ('test_continuous_batching_step_admits_a_request_whose_whole_cache_fits_the_budget_exactly', 'test_continuous_batching_step_keeps_the_batch_and_the_cache_within_their_limits')),
    Wrong('step-running-replaced-not-in-place',
          'running[:] = [r for r in running if len(r.output) < r.max_new_tokens]',
          'running = [r for r in running if len(r.output) < r.max_new_tokens]',
          ('test_continuous_batching_step_admits_a_request_whose_whole_cache_fits_the_budget_exactly', 'test_continuous_batching_step_gives_each_request_the_tokens_it_gets_alone')),
    Wrong('step-token-argmin',
          'r.output.append(int(row.argmax()))',
          'r.output.append(int(row.argmin()))',
          ('test_continuous_batching_step_gives_each_request_the_tokens_it_gets_alone', 'test_continuous_batching_step_retires_each_request_at_its_last_token_in_arrival_order')),
    Wrong('ratio-kv-of-seq_len-plus-one-only-in-batch',
          'kv = batch * (seq_len + 1) * 2',
          'kv = batch * seq_len * 2',
          ('test_layers_doubled_throughput_ratio_matches_the_serving_simulator', 'test_layers_doubled_throughput_ratio_of_small_models_matches_the_serving_simulator')),
]

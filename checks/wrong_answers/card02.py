"""card02's plausible wrong answers, each with the tests written to catch it (checks/test_alternatives.py)."""

from wrong_answers import Wrong

SOLUTION = "solutions/card02_memory_vs_compute/costs.py"

BYTES = "test_kv_cache_bytes_match_nbytes_of_a_filled_cache"
BYTES_INT = "test_kv_cache_bytes_of_integer_and_wide_element_types_match_an_allocated_cache"
BYTES_40 = "test_kv_cache_bytes_of_40_layers_of_32_heads_at_4000_tokens_hold_k_and_v"
PER_TOKEN = "test_kv_bytes_per_token_match_a_one_token_cache"
PER_TOKEN_PRESETS = "test_kv_bytes_per_token_of_every_real_preset_match_a_one_token_cache"
PER_TOKEN_70B = "test_llama_2_70b_bytes_per_token_against_a_widely_shared_figure_for_1000_tokens"
PER_TOKEN_MQA = "test_kv_bytes_per_token_of_mqa_are_those_of_mha_over_the_head_count"
FITS = "test_fits_in_memory_draws_the_line_at_measured_weights_plus_cache"
FITS_REAL = "test_fits_in_memory_of_real_models_on_real_devices"
ROOF = "test_roofline_step_time_is_the_roofline_of_measured_flops_and_bytes"
ROOF_PEAK = "test_roofline_step_time_uses_the_peak_of_the_dtype_it_computes_in"
ROOF_70B = "test_roofline_step_time_of_llama_2_70b_on_devices_it_fits"
ROOF_LAWS = "test_roofline_step_time_obeys_the_roofline_laws_on_real_presets"
ROOF_WINDOW = "test_roofline_step_time_of_mistral_7b_reads_its_window_and_no_further"
ROOF_SHORT = "test_where_recompute_beats_the_cache_it_does_only_at_short_lengths"
RATIO_FLAT = "test_recompute_to_read_ratio_does_not_depend_on_sequence_length_and_scales_with_the_hardware"
RATIO_WIDTH = "test_recompute_to_read_ratio_halves_with_elements_twice_as_wide_at_the_same_peak"
RATIO = "test_recompute_to_read_ratio_matches_measured_flops_and_cache_bytes"
RATIO_REAL = "test_no_real_preset_would_rather_recompute_on_any_gpu"
RATIO_TOY = "test_a_toy_with_wide_kv_heads_and_few_weights_would_rather_recompute"

CACHE = "return 2 * cfg.n_layers * batch * seq_len * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize  # K and V"
TOKEN = "return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize  # itemsize is bytes"
FITS_LAYER = "layer = 2 * d * H * D + 2 * d * Hkv * D + experts * mlp + d * cfg.n_experts + 2 * d  # + router, 2 norms"
FITS_EMB = "embeddings = (1 if cfg.tie_embeddings else 2) * cfg.vocab_size * d"
FITS_W = "weights = (L * layer + embeddings + d) * dtype.itemsize  # + the final norm"
FITS_RET = "return weights + kv_cache_bytes(cfg, batch, seq_len, dtype) <= hw.memory_bytes"
ROOF_W = "weights = L * (2 * d * H * D + 2 * d * Hkv * D + mlp) + d * cfg.vocab_size"
KEYS = "keys = min(T, cfg.sliding_window) if (use_cache and cfg.sliding_window) else T"
FLOPS = "flops = 2 * batch * S * weights + 4 * L * batch * H * S * keys * D"
READ = "bytes_ += kv_cache_bytes(cfg, batch, keys, dtype)  # read keys - 1 positions, write one"
MAX = "return max(flops / hw.peak_flops(dtype), bytes_ / hw.mem_bandwidth)"
NEEDED = "needed = (L - 1) * layer + 2 * d * Hkv * D  # every layer below the last, then its k and v projections"
RECOMPUTE = "recompute = seq_len * 2 * needed / hw.peak_flops(dtype)  # no lm_head, no last q/o/MLP"
RATIO_RET = "return recompute / read  # seq_len cancels"

WRONG = [
    # --- kv_cache_bytes ------------------------------------------------------------------------------
    Wrong("cache-k-only", CACHE, CACHE.replace("2 * cfg.n_layers", "cfg.n_layers"), (BYTES, BYTES_INT, BYTES_40)),
    Wrong("cache-with-n_heads", CACHE, CACHE.replace("cfg.n_kv_heads", "cfg.n_heads"), (BYTES, BYTES_INT)),
    Wrong("cache-of-one-layer", CACHE, CACHE.replace("cfg.n_layers * ", ""), (BYTES, BYTES_INT, BYTES_40)),
    Wrong("cache-of-one-sequence", CACHE, CACHE.replace("batch * ", ""), (BYTES, BYTES_INT, BYTES_40)),
    Wrong("cache-in-bits", CACHE, CACHE.replace("dtype.itemsize", "torch.finfo(dtype).bits"), (BYTES, BYTES_INT, BYTES_40)),
    Wrong("cache-bytes-from-finfo", CACHE, CACHE.replace("dtype.itemsize", "torch.finfo(dtype).bits // 8"), (BYTES_INT,)),
    Wrong("cache-two-bytes-an-element", CACHE, CACHE.replace("dtype.itemsize", "2"), (BYTES, BYTES_INT)),
    Wrong("cache-d_model-for-kv-heads-times-head-dim", CACHE, CACHE.replace("cfg.n_kv_heads * cfg.head_dim", "cfg.d_model"),
          (BYTES, BYTES_INT)),
    Wrong("cache-one-position-too-many", CACHE, CACHE.replace("seq_len", "(seq_len + 1)"), (BYTES, BYTES_INT, BYTES_40)),
    # --- kv_bytes_per_token --------------------------------------------------------------------------
    Wrong("per-token-k-only", TOKEN, TOKEN.replace("2 * cfg.n_layers", "cfg.n_layers"),
          (PER_TOKEN, PER_TOKEN_PRESETS, PER_TOKEN_70B, PER_TOKEN_MQA)),
    Wrong("per-token-with-n_heads", TOKEN, TOKEN.replace("cfg.n_kv_heads", "cfg.n_heads"),
          (PER_TOKEN, PER_TOKEN_PRESETS, PER_TOKEN_70B, PER_TOKEN_MQA)),
    Wrong("per-token-of-one-layer", TOKEN, TOKEN.replace("cfg.n_layers * ", ""),
          (PER_TOKEN, PER_TOKEN_PRESETS, PER_TOKEN_70B, PER_TOKEN_MQA)),
    Wrong("per-token-in-bits", TOKEN, TOKEN.replace("dtype.itemsize", "torch.finfo(dtype).bits"),
          (PER_TOKEN, PER_TOKEN_PRESETS, PER_TOKEN_70B, PER_TOKEN_MQA)),
    Wrong("per-token-bytes-from-finfo", TOKEN, TOKEN.replace("dtype.itemsize", "torch.finfo(dtype).bits // 8"),
          (PER_TOKEN, PER_TOKEN_PRESETS)),
    Wrong("per-token-two-bytes-an-element", TOKEN, TOKEN.replace("dtype.itemsize", "2"), (PER_TOKEN, PER_TOKEN_PRESETS)),
    Wrong("per-token-d_model-for-kv-heads-times-head-dim", TOKEN, TOKEN.replace("cfg.n_kv_heads * cfg.head_dim", "cfg.d_model"),
          (PER_TOKEN, PER_TOKEN_PRESETS, PER_TOKEN_70B, PER_TOKEN_MQA)),
    Wrong("per-token-mqa-as-an-eighth", TOKEN, TOKEN.replace("cfg.n_kv_heads", "max(cfg.n_kv_heads, cfg.n_heads // 8)"),
          (PER_TOKEN_MQA,)),
    # --- fits_in_memory ------------------------------------------------------------------------------
    Wrong("fits-strictly-below", FITS_RET, FITS_RET.replace("<=", "<"), (FITS,)),
    Wrong("fits-weights-per-sequence", FITS_RET, FITS_RET.replace("return weights", "return batch * weights"), (FITS,)),
    Wrong("fits-weights-only", FITS_RET, "return weights <= hw.memory_bytes", (FITS, FITS_REAL)),
    Wrong("fits-cache-only", FITS_RET, "return kv_cache_bytes(cfg, batch, seq_len, dtype) <= hw.memory_bytes", (FITS, FITS_REAL)),
    Wrong("fits-untied-always", FITS_EMB, "embeddings = 2 * cfg.vocab_size * d", (FITS,)),
    Wrong("fits-embedding-only", FITS_EMB, "embeddings = cfg.vocab_size * d", (FITS,)),
    Wrong("fits-no-embeddings", FITS_EMB, "embeddings = 0", (FITS,)),
    Wrong("fits-the-routed-experts-only", "experts = max(cfg.n_experts, 1)", "experts = max(cfg.experts_per_token, 1)",
          (FITS, FITS_REAL)),
    Wrong("fits-one-expert", "experts = max(cfg.n_experts, 1)", "experts = 1", (FITS, FITS_REAL)),
    Wrong("fits-no-router", FITS_LAYER, FITS_LAYER.replace(" + d * cfg.n_experts", ""), (FITS,)),
    Wrong("fits-no-norms", FITS_LAYER, FITS_LAYER.replace(" + 2 * d  #", "  #"), (FITS,)),
    Wrong("fits-no-final-norm", FITS_W, FITS_W.replace(" + d)", ")"), (FITS,)),
    Wrong("fits-kv-projections-with-n_heads", FITS_LAYER, FITS_LAYER.replace("2 * d * Hkv * D", "2 * d * H * D"), (FITS,)),
    Wrong("fits-swiglu-always", "mlp = (3 if cfg.mlp == \"swiglu\" else 2) * d * cfg.d_ff\n    experts",
          "mlp = 3 * d * cfg.d_ff\n    experts", (FITS,)),
    Wrong("fits-weights-in-two-bytes", FITS_W, FITS_W.replace("dtype.itemsize", "2"), (FITS, FITS_REAL)),
    # --- roofline_step_time ------------------------------------------------------------------------------------
    Wrong("roofline-sum-not-max", MAX, "return flops / hw.peak_flops(dtype) + bytes_ / hw.mem_bandwidth",
          (ROOF, ROOF_70B)),
    Wrong("roofline-bf16-peak-always", MAX, MAX.replace("hw.peak_flops(dtype)", "hw.peak_flops(torch.bfloat16)"),
          (ROOF, ROOF_PEAK)),
    Wrong("roofline-in-milliseconds", MAX, "return 1e3 * " + MAX[len("return "):], (ROOF, ROOF_70B, ROOF_LAWS)),
    Wrong("roofline-min-not-max", MAX, MAX.replace("max(", "min("), (ROOF, ROOF_70B)),
    Wrong("roofline-no-lm_head", ROOF_W, ROOF_W.replace(" + d * cfg.vocab_size", ""), (ROOF, ROOF_70B)),
    Wrong("roofline-reads-the-embedding-table-too", ROOF_W, ROOF_W.replace("+ d * cfg.vocab_size", "+ 2 * d * cfg.vocab_size"),
          (ROOF, ROOF_70B)),
    Wrong("roofline-swiglu-always", "mlp = (3 if cfg.mlp == \"swiglu\" else 2) * d * cfg.d_ff\n    weights = L",
          "mlp = 3 * d * cfg.d_ff\n    weights = L", (ROOF,)),
    Wrong("roofline-kv-projections-with-n_heads", ROOF_W, ROOF_W.replace("2 * d * Hkv * D", "2 * d * H * D"), (ROOF, ROOF_70B)),
    Wrong("roofline-scores-with-n_kv_heads", FLOPS, FLOPS.replace("* H *", "* Hkv *"), (ROOF,)),
    Wrong("roofline-scores-over-seq_len-keys", "T = seq_len + 1  # positions up to the new token",
          "T = seq_len  # positions up to the new token", (ROOF,)),
    Wrong("roofline-one-flop-per-weight", FLOPS, FLOPS.replace("flops = 2 * batch", "flops = batch"), (ROOF,)),
    Wrong("roofline-cached-reads-seq_len-positions", READ, "bytes_ += kv_cache_bytes(cfg, batch, keys - 1, dtype)", (ROOF, ROOF_70B)),
    Wrong("roofline-cached-reads-one-sequence", READ, "bytes_ += kv_cache_bytes(cfg, 1, keys, dtype)", (ROOF, ROOF_70B)),
    Wrong("roofline-weights-read-per-sequence", "bytes_ = weights * dtype.itemsize", "bytes_ = batch * weights * dtype.itemsize",
          (ROOF, ROOF_70B)),
    Wrong("roofline-uncached-reads-the-cache-too", "    if use_cache:\n        bytes_ +=", "    if True:\n        bytes_ +=",
          (ROOF,)),
    Wrong("roofline-no-sliding-window", KEYS, "keys = T", (ROOF_WINDOW,)),
    Wrong("roofline-window-caps-the-uncached-rectangle", KEYS, "keys = min(T, cfg.sliding_window) if cfg.sliding_window else T",
          (ROOF_WINDOW,)),
    Wrong("roofline-window-of-w-plus-one", KEYS, "keys = min(T, cfg.sliding_window + 1) if (use_cache and cfg.sliding_window) else T",
          (ROOF_WINDOW,)),
    Wrong("roofline-cached-step-feeds-the-whole-sequence", "S = 1 if use_cache else T", "S = T", (ROOF, ROOF_LAWS)),
    Wrong("roofline-window-caps-the-reads-not-the-scores", FLOPS, FLOPS.replace("* keys *", "* T *"), (ROOF_WINDOW,)),
    Wrong("roofline-window-caps-the-scores-not-the-reads", READ, READ.replace("batch, keys, dtype", "batch, T, dtype"),
          (ROOF_WINDOW,)),
    Wrong("roofline-weights-in-two-bytes", "bytes_ = weights * dtype.itemsize", "bytes_ = weights * 2", (ROOF,)),
    Wrong("roofline-cache-in-two-bytes", READ, READ.replace("batch, keys, dtype", "batch, keys, torch.bfloat16"), (ROOF,)),
    Wrong("roofline-uncached-scores-the-causal-triangle", FLOPS,
          "flops = 2 * batch * S * weights + 4 * L * batch * H * (S * keys if use_cache else S * (S + 1) // 2) * D", (ROOF,)),
    # --- recompute_to_read_ratio ---------------------------------------------------------------------
    Wrong("recompute-the-whole-forward", NEEDED, "needed = L * layer + d * cfg.vocab_size", (RATIO, RATIO_REAL)),
    Wrong("recompute-every-layer-in-full", NEEDED, "needed = L * layer", (RATIO, RATIO_REAL)),
    Wrong("recompute-one-k-and-v-projection", NEEDED, "needed = 2 * d * Hkv * D", (RATIO, RATIO_REAL)),
    Wrong("recompute-k-and-v-in-every-layer-only", NEEDED, "needed = L * 2 * d * Hkv * D", (RATIO, RATIO_REAL)),
    Wrong("recompute-the-last-layer-in-full", NEEDED, "needed = (L - 1) * layer + layer", (RATIO, RATIO_REAL)),
    Wrong("recompute-last-k-and-v-with-n_heads", NEEDED, "needed = (L - 1) * layer + 2 * d * H * D", (RATIO,)),
    Wrong("recompute-through-lm_head-too", NEEDED, "needed = (L - 1) * layer + 2 * d * Hkv * D + d * cfg.vocab_size",
          (RATIO, RATIO_REAL)),
    Wrong("recompute-swiglu-always", "mlp = (3 if cfg.mlp == \"swiglu\" else 2) * d * cfg.d_ff\n    layer = 2 * d * H * D + 2 * d * Hkv * D + mlp\n",
          "mlp = 3 * d * cfg.d_ff\n    layer = 2 * d * H * D + 2 * d * Hkv * D + mlp\n", (RATIO,)),
    Wrong("recompute-one-flop-per-weight", RECOMPUTE, RECOMPUTE.replace("seq_len * 2 * needed", "seq_len * needed"),
          (RATIO, RATIO_REAL)),
    Wrong("recompute-adds-the-quadratic-scores", RECOMPUTE,
          "recompute = (seq_len * 2 * needed + 4 * L * H * D * seq_len * seq_len) / hw.peak_flops(dtype)",
          (RATIO_FLAT, RATIO)),
    Wrong("recompute-ratio-inverted", RATIO_RET, "return read / recompute  # seq_len cancels",
          (RATIO_FLAT, RATIO, RATIO_REAL, RATIO_TOY)),
    Wrong("recompute-read-in-one-byte-elements", "read = kv_cache_bytes(cfg, 1, seq_len, dtype)",
          "read = kv_cache_bytes(cfg, 1, seq_len, torch.int8)", (RATIO_WIDTH, RATIO)),
    Wrong("recompute-at-the-bf16-peak", RECOMPUTE, RECOMPUTE.replace("hw.peak_flops(dtype)", "hw.peak_flops(torch.bfloat16)"),
          (RATIO,)),
    Wrong('bytes-head-dim-from-d_model',
          'return 2 * cfg.n_layers * batch * seq_len * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize  # K and V',
          'return 2 * cfg.n_layers * batch * seq_len * cfg.n_kv_heads * (cfg.d_model // cfg.n_heads) * dtype.itemsize',
          ('test_a_toy_with_wide_kv_heads_and_few_weights_would_rather_recompute', 'test_fits_in_memory_draws_the_line_at_measured_weights_plus_cache')),
    Wrong('per-token-head-dim-from-d_model',
          'return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize  # itemsize',
          'return 2 * cfg.n_layers * cfg.n_kv_heads * (cfg.d_model // cfg.n_heads) * dtype.itemsize  #',
          ('test_kv_bytes_per_token_match_a_one_token_cache',)),
    Wrong('roofline-weights-in-fp32',
          '    bytes_ = weights * dtype.itemsize\n',
          '    bytes_ = weights * 4\n',
          ('test_roofline_step_time_is_the_roofline_of_measured_flops_and_bytes', 'test_roofline_step_time_of_llama_2_70b_on_devices_it_fits')),
    Wrong('ratio-gib',
          'read = kv_cache_bytes(cfg, 1, seq_len, dtype) / hw.mem_bandwidth',
          'read = kv_cache_bytes(cfg, 1, seq_len, dtype) / (hw.mem_bandwidth / 1e9 * 2**30)',
          ('test_no_real_preset_would_rather_recompute_on_any_gpu', 'test_recompute_to_read_ratio_matches_measured_flops_and_cache_bytes')),
]

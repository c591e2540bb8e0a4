"""card04's plausible wrong answers, each with the tests written to catch it (checks/test_alternatives.py)."""

from wrong_answers import Wrong

SOLUTION = "solutions/card04_quantization/quant.py"

BYTES = ("test_quantized_kv_bytes_match_nbytes_of_codes_scales_and_zero_points",)
BYTES_ALL = BYTES + ("test_quantized_kv_bytes_of_llama_2_7b_at_int4_against_fp16",
                     "test_quantized_kv_bytes_of_real_presets_match_a_meta_allocated_cache")
BUDGET = ("test_kv_tokens_in_budget_is_the_longest_cache_whose_nbytes_fit",)
QUANT = ("test_kv_quantize_gives_kvrefs_scales_and_codes_within_half_a_step",
         "test_kv_quantize_of_a_worked_example_per_token_and_per_channel")
DEQUANT = ("test_kv_dequantize_reads_kvrefs_codes_back_within_half_a_step",)
PACK = ("test_int4_pack_stores_two_codes_a_byte_as_kvrefs_cache_does",
        "test_int4_pack_of_a_kvref_cache_block_reproduces_its_stored_bytes")
UNPACK = ("test_int4_unpack_recovers_the_codes_kvref_packed",
          "test_int4_unpack_of_a_kvref_cache_block_reads_its_stored_bytes_back")
AXES = ("test_key_axis_errors_on_outlier_channel_keys_favour_per_channel",
        "test_key_axis_errors_on_outlier_token_keys_favour_per_token")
SCORE = ("test_key_error_score_bound_is_reached_by_some_key_error",)
RATIO = ("test_softmax_weight_ratio_bound_is_reached_by_some_shift_of_the_scores",)

VALUES = "values = 2 * cfg.n_layers * batch * seq_len * cfg.n_kv_heads * cfg.head_dim  # K and V elements"
RETURN_BYTES = "return values * bits // 8 + groups * per_group"
PER_GROUP = "per_group = (2 if asymmetric else 1) * scale_dtype.itemsize"
TOKENS = "return budget_bytes // per_token"
DIM = 'dim = 3 if axis == "token" else 2'
ROUND = "q = torch.round(shifted / safe).clamp(lo, hi).to(torch.int16)"
DEQ = "x = q.float() * scale.float()"
PACKED = "return (low | (high << 4)).to(torch.uint8)"
UNPACKED = "return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])"
DELTA = "delta = (q.float() @ (k.float() - k_hat).transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, S, T)"
RMS = "errors[axis] = float(delta.double().pow(2).mean().sqrt())"

WRONG = [
    # quantized_kv_bytes
    Wrong("bytes-K-and-V-counted-once", VALUES, VALUES.replace("2 * cfg", "cfg"), BYTES_ALL),
    Wrong("bytes-n_heads-for-n_kv_heads", VALUES, VALUES.replace("n_kv_heads", "n_heads"),
          BYTES + ("test_quantized_kv_bytes_of_real_presets_match_a_meta_allocated_cache",)),
    Wrong("bytes-one-layer", VALUES, VALUES.replace("cfg.n_layers * ", ""), BYTES_ALL),
    Wrong("bytes-batch-forgotten", VALUES, VALUES.replace("batch * ", ""),
          BYTES + ("test_quantized_kv_bytes_of_real_presets_match_a_meta_allocated_cache",)),
    Wrong("bytes-no-scales", RETURN_BYTES, "return values * bits // 8", BYTES_ALL),
    Wrong("bytes-codes-unpacked-one-a-byte", RETURN_BYTES, "return values + groups * per_group", BYTES_ALL),
    Wrong("bytes-bits-for-bytes", RETURN_BYTES, "return values * bits + groups * per_group", BYTES_ALL),
    Wrong("bytes-integer-bytes-per-code", RETURN_BYTES, "return values * (bits // 8) + groups * per_group", BYTES_ALL),
    Wrong("bytes-a-float-not-an-int", RETURN_BYTES, "return values * bits / 8 + groups * per_group", BYTES_ALL),
    Wrong("bytes-zero-point-always", PER_GROUP, "per_group = 2 * scale_dtype.itemsize", BYTES_ALL),
    Wrong("bytes-zero-point-never", PER_GROUP, "per_group = scale_dtype.itemsize", BYTES_ALL),
    Wrong("bytes-scales-always-fp16", PER_GROUP, "per_group = (2 if asymmetric else 1) * 2", BYTES),
    Wrong("bytes-one-scale-per-token-per-head", "groups = values // group_size", "groups = values // cfg.head_dim",
          BYTES_ALL),
    # kv_tokens_in_budget
    Wrong("tokens-ceil-for-floor", TOKENS, "return -(-budget_bytes // per_token)", BUDGET),
    Wrong("tokens-a-float", TOKENS, "return budget_bytes / per_token", BUDGET),
    Wrong("tokens-rounded", TOKENS, "return round(budget_bytes / per_token)", BUDGET),
    Wrong("tokens-one-short", TOKENS, "return max(budget_bytes // per_token - 1, 0)", BUDGET),
    Wrong("tokens-scales-forgotten", "per_token = quantized_kv_bytes(cfg, 1, 1, bits, group_size, asymmetric, scale_dtype)",
          "per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * bits // 8",
          BUDGET + ("test_kv_tokens_in_budget_of_two_7b_models_and_of_two_1t_models",)),
    Wrong("tokens-fp16-bytes-whatever-the-bits",
          "per_token = quantized_kv_bytes(cfg, 1, 1, bits, group_size, asymmetric, scale_dtype)",
          "per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2",
          BUDGET + ("test_kv_tokens_in_budget_of_two_7b_models_and_of_two_1t_models",)),
    # kv_quantize
    Wrong("quantize-the-wrong-axis", DIM, 'dim = 2 if axis == "token" else 3', QUANT),
    Wrong("quantize-floor-not-round", ROUND, ROUND.replace("torch.round(", "torch.floor("), QUANT),
    Wrong("quantize-half-up", ROUND, ROUND.replace("torch.round(shifted / safe)", "torch.floor(shifted / safe + 0.5)"),
          ("test_kv_quantize_rounds_exact_halves_to_even",)),
    Wrong("quantize-half-away-from-zero", ROUND,
          ROUND.replace("torch.round(shifted / safe)", "(torch.sign(shifted) * torch.floor((shifted / safe).abs() + 0.5))"),
          ("test_kv_quantize_rounds_exact_halves_to_even",)),
    Wrong("quantize-divisor-2^bits", "scale = (x.amax(dim, keepdim=True) - zero) / (2**bits - 1)",
          "scale = (x.amax(dim, keepdim=True) - zero) / 2**bits", QUANT),
    Wrong("quantize-int4-range-minus-8-to-7-scale-over-8", "scale = x.abs().amax(dim, keepdim=True) / hi",
          "scale = x.abs().amax(dim, keepdim=True) / (hi + 1)", QUANT),
    Wrong("quantize-symmetric-max-not-max-abs", "scale = x.abs().amax(dim, keepdim=True) / hi",
          "scale = x.amax(dim, keepdim=True) / hi", QUANT),
    Wrong("quantize-zero-point-dropped", "shifted = x - zero", "shifted = x",
          ("test_kv_quantize_gives_kvrefs_scales_and_codes_within_half_a_step",
           "test_kv_quantize_of_a_worked_example_per_token_and_per_channel")),
    Wrong("quantize-integer-zero-point", "zero = x.amin(dim, keepdim=True)",
          "zero = x.amin(dim, keepdim=True).round()", QUANT),
    Wrong("quantize-codes-kept-as-floats", ROUND, "q = torch.round(shifted / safe).clamp(lo, hi)",
          ("test_kv_quantize_gives_kvrefs_scales_and_codes_within_half_a_step",)),
    Wrong("quantize-symmetric-codes-in-uint8", ROUND, ROUND.replace("torch.int16", "torch.uint8"),
          ("test_kv_quantize_gives_kvrefs_scales_and_codes_within_half_a_step",
           "test_kv_quantize_of_a_worked_example_per_token_and_per_channel")),
    Wrong("quantize-scales-in-the-input-dtype", "    x = x.float()\n", "",
          ("test_kv_quantize_of_half_precision_keys_returns_float32_scales_and_zero_points",)),
    # Unguarded 0 / 0 = NaN in a constant group: NaN casts to int16 as 0 on x86 and ARM (the same codes as the
    # guard gives), but to int32 as -2^31, out of range.
    Wrong("quantize-divides-by-a-zero-scale", ROUND, "q = torch.round(shifted / scale).clamp(lo, hi).to(torch.int32)",
          ("test_kv_quantize_gives_kvrefs_scales_and_codes_within_half_a_step",)),
    # kv_dequantize
    Wrong("dequantize-zero-point-dropped", "return x if zero is None else x + zero.float()", "return x", DEQUANT),
    Wrong("dequantize-zero-inside-the-product", DEQ + "\n    return x if zero is None else x + zero.float()",
          DEQ + "\n    return x if zero is None else (q.float() - zero.float()) * scale.float()", DEQUANT),
    Wrong("dequantize-divides-by-the-scale", DEQ, "x = q.float() / scale.float()", DEQUANT),
    Wrong("dequantize-in-the-scales-dtype", DEQ + "\n    return x if zero is None else x + zero.float()",
          "x = q * scale\n    return x if zero is None else x + zero",
          ("test_kv_dequantize_of_float16_scales_returns_float32",)),
    # int4_pack / int4_unpack
    Wrong("pack-high-nibble-first", PACKED, "return ((low << 4) | high).to(torch.uint8)", PACK),
    Wrong("pack-first-half-low-second-half-high", "low, high = codes[..., 0::2], codes[..., 1::2]",
          "low, high = codes.chunk(2, dim=-1)", PACK),
    Wrong("pack-signed-bytes", PACKED, "return (low | (high << 4)).to(torch.int8)",
          ("test_int4_pack_stores_two_codes_a_byte_as_kvrefs_cache_does",)),
    Wrong("pack-or-forgotten-sum-of-nibbles-unshifted", PACKED, "return (low | high).to(torch.uint8)", PACK),
    Wrong("unpack-high-nibble-first", UNPACKED, UNPACKED.replace("[low, high]", "[high, low]"), UNPACK),
    Wrong("unpack-concatenates-the-halves", UNPACKED, "return torch.cat([low, high], dim=-1)", UNPACK),
    Wrong("unpack-flattens-the-leading-axes", UNPACKED, "return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)",
          ("test_int4_unpack_of_a_kvref_cache_block_reads_its_stored_bytes_back",)),
    Wrong("unpack-high-nibble-unmasked-signed", "low, high = packed & 0x0F, packed >> 4",
          "low, high = packed & 0x0F, packed.to(torch.int8) >> 4", UNPACK),
    Wrong("unpack-returns-int64", UNPACKED, UNPACKED.replace("2 * packed.shape[-1])", "2 * packed.shape[-1]).long()"),
          UNPACK),
    # key_axis_errors
    Wrong("axis-errors-swapped", "errors[axis] = ", 'errors["channel" if axis == "token" else "token"] = ', AXES),
    Wrong("axis-errors-no-1/sqrt(D)", DELTA, DELTA.replace(" / math.sqrt(q.shape[-1])", ""), AXES),
    Wrong("axis-errors-sqrt(T)-for-sqrt(D)", DELTA, DELTA.replace("q.shape[-1]", "k.shape[-2]"), AXES),
    Wrong("axis-errors-mean-absolute-error", RMS, "errors[axis] = float(delta.double().abs().mean())", AXES),
    Wrong("axis-errors-mean-square-not-root", RMS, "errors[axis] = float(delta.double().pow(2).mean())", AXES),
    Wrong("axis-errors-key-error-not-score-error", DELTA,
          "delta = k.float() - k_hat  # (B, H, T, D)", AXES),
    Wrong("axis-errors-symmetric-quantizer", "codes, scale, zero = kv_quantize(k, bits, axis, True)",
          "codes, scale, zero = kv_quantize(k, bits, axis, False)", AXES),
    # key_error_score_bound
    Wrong("score-bound-no-1/sqrt(D)", "return q_norm * dk_norm / math.sqrt(head_dim)", "return q_norm * dk_norm",
          SCORE),
    Wrong("score-bound-over-D", "return q_norm * dk_norm / math.sqrt(head_dim)", "return q_norm * dk_norm / head_dim",
          SCORE + ("test_key_error_score_bound_holds_for_every_score_of_quantized_keys",)),
    Wrong("score-bound-half-a-step", "return q_norm * dk_norm / math.sqrt(head_dim)",
          "return q_norm * dk_norm / 2 / math.sqrt(head_dim)",
          SCORE + ("test_key_error_score_bound_holds_for_every_score_of_quantized_keys",)),
    Wrong("score-bound-times-sqrt(D)", "return q_norm * dk_norm / math.sqrt(head_dim)",
          "return q_norm * dk_norm * math.sqrt(head_dim)", SCORE),
    # softmax_weight_ratio_bound
    Wrong("ratio-bound-exp(eps)", "return math.exp(2 * max_score_shift)", "return math.exp(max_score_shift)",
          RATIO + ("test_softmax_weight_ratio_bound_holds_for_drawn_scores_and_shifts",)),
    Wrong("ratio-bound-linearised", "return math.exp(2 * max_score_shift)", "return 1 + 2 * max_score_shift",
          RATIO + ("test_softmax_weight_ratio_bound_holds_for_drawn_scores_and_shifts",)),
    Wrong("ratio-bound-the-change-not-the-ratio", "return math.exp(2 * max_score_shift)",
          "return math.exp(2 * max_score_shift) - 1", RATIO),
    Wrong("ratio-bound-1-plus-eps-squared", "return math.exp(2 * max_score_shift)",
          "return (1 + max_score_shift) ** 2", RATIO),
]

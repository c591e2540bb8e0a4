"""card06's plausible wrong answers, each with the tests written to catch it (checks/test_alternatives.py)."""

from wrong_answers import Wrong

SOLUTION = "solutions/card06_positions/rope.py"
ALIBI = "solutions/card06_positions/alibi.py"

ROTATE = ("test_rope_rotate_equals_the_rotation_of_llama_and_gptj_code",)
UNIT = ("test_rope_rotate_of_unit_vectors_pairs_the_right_dimensions_at_the_right_frequencies",)
PARTIAL = ("test_rope_rotate_with_partial_rotary_leaves_the_last_dimensions_alone",)
RELATIVE = ("test_rope_relative_score_equals_scores_measured_at_many_absolute_positions",)
DECODE = ("test_rope_cached_decode_equals_full_recompute_at_every_step",)
WINDOW = ("test_rope_cached_decode_in_a_sliding_window_rotates_by_position_not_slot",)
DECODE_BF16 = ("test_rope_cached_decode_of_bf16_input_takes_its_scores_and_softmax_in_fp32",)
REROTATE = ("test_rope_rerotate_equals_rotating_the_raw_key_at_p_plus_delta",)
SINKS = ("test_rope_rerotate_renumbers_a_sink_cache_as_if_rotated_from_scratch",)
FLOPS = ("test_rope_decode_flops_match_the_ops_counted_in_a_cached_model_step",
         "test_rope_decode_flops_of_llama_3_8b_are_a_rounding_error_next_to_its_matmuls")
FLOPS_PARTIAL = ("test_rope_decode_flops_with_partial_rotary_match_the_counted_rotations",)
SLOPES = ("test_alibi_slopes_equal_blooms_for_power_of_two_and_other_head_counts",
          "test_alibi_slopes_of_8_and_12_heads_are_the_papers")
ALIBI_DECODE = ("test_alibi_cached_decode_over_a_shifting_window_equals_attention_recomputed_from_positions",)
ALIBI_BF16 = ("test_alibi_cached_decode_of_bf16_input_takes_its_scores_and_softmax_in_fp32",)

INV_FREQ = "inv_freq = 1.0 / theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r)  # (r/2,)"
HALF = "out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)"
INTERLEAVED = "out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)"
BACK = "return torch.cat([out, xf[..., r:]], dim=-1).to(x.dtype)"
Q_AT = "q_at = rope_rotate(q[:, None, :], torch.tensor([distance]), theta, convention)[:, 0]  # (N, D)"
WHERE = "where = torch.tensor([pos])"
QK = "q, k = rope_rotate(q, where, theta, convention), rope_rotate(k, where, theta, convention)"
CACHES = "k_cache, v_cache = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)  # (B, H, T + 1, D)"
SCORES = "scores = (q.float() @ k_cache.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, 1, T + 1)"
RE = "return rope_rotate(k_rot, torch.full((k_rot.shape[-2],), delta), theta, convention, rotary_dim)"
FLOP = "return 3 * r * (cfg.n_heads + cfg.n_kv_heads) * cfg.n_layers * batch"
LOW = "low = 2 ** math.floor(math.log2(n_heads))"
FIRST = "first = [2.0 ** (-8.0 * (i + 1) / low) for i in range(low)]"
EXTRA = "extra = [2.0 ** (-8.0 * (i + 1) / (2 * low)) for i in range(0, 2 * (n_heads - low), 2)]"
DISTANCE = "distance = torch.arange(T1 - 1, -1, -1, dtype=torch.float32)  # (T + 1,): T .. 0, the new key last"
BIAS = "scores = scores - slopes.float()[:, None, None] * distance  # (B, H, 1, T + 1)"

WRONG = [
    # rope_rotate
    Wrong("rotate-conventions-swapped", 'if convention == "half":', 'if convention != "half":', ROTATE + UNIT),
    Wrong("rotate-sin-sign-flipped", HALF, "out = torch.cat([a * cos + b * sin, b * cos - a * sin], dim=-1)",
          ROTATE + UNIT),
    Wrong("rotate-frequencies-reversed", INV_FREQ, INV_FREQ.replace("# (r/2,)", "\n    inv_freq = inv_freq.flip(0)"),
          ROTATE + UNIT),
    Wrong("rotate-frequencies-over-D-with-partial-rotary", INV_FREQ, INV_FREQ.replace("/ r)", "/ x.shape[-1])"),
          ROTATE + PARTIAL),
    Wrong("rotate-theta-to-the-minus-i-over-r", INV_FREQ,
          "inv_freq = 1.0 / theta ** (torch.arange(0, r // 2, dtype=torch.float32) / r)", ROTATE + UNIT),
    Wrong("rotate-theta-to-the-plus-2i-over-r", INV_FREQ,
          "inv_freq = theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r)", ROTATE + UNIT),
    Wrong("rotate-positions-from-the-first-input_pos", "angles = input_pos.float()[:, None] * inv_freq",
          "angles = (input_pos[0] + torch.arange(input_pos.shape[0])).float()[:, None] * inv_freq",
          ("test_rope_rotate_takes_each_rows_position_from_input_pos_in_any_order",)),
    Wrong("rotate-positions-from-0", "angles = input_pos.float()[:, None] * inv_freq",
          "angles = torch.arange(input_pos.shape[0]).float()[:, None] * inv_freq", ROTATE + UNIT),
    Wrong("rotate-half-pairs-j-with-j-plus-D/2", "a, b = xf[..., : r // 2], xf[..., r // 2: r]",
          "a, b = xf[..., : r // 2], xf[..., x.shape[-1] // 2: x.shape[-1] // 2 + r // 2]", ROTATE + PARTIAL),
    Wrong("rotate-interleaved-output-not-interleaved-back", INTERLEAVED,
          "out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)", ROTATE + UNIT),
    Wrong("rotate-in-the-input-dtype", "cos, sin = angles.cos(), angles.sin()\n    xf = x.float()",
          "cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)\n    xf = x",
          ("test_rope_rotate_of_bf16_input_is_computed_in_fp32",)),
    Wrong("rotate-positions-in-the-inputs-dtype", "angles = input_pos.float()[:, None] * inv_freq",
          "angles = input_pos.to(x.dtype)[:, None] * inv_freq",
          ("test_rope_rotate_of_bf16_input_at_long_positions_turns_by_the_exact_position",)),
    Wrong("rotate-returns-fp32", BACK, "return torch.cat([out, xf[..., r:]], dim=-1)",
          ("test_rope_rotate_of_bf16_input_is_computed_in_fp32", "test_rope_rotate_of_fp16_input_returns_fp16")),
    Wrong("rotate-returns-bf16-whatever-the-input", BACK, "return torch.cat([out, xf[..., r:]], dim=-1).bfloat16()",
          ("test_rope_rotate_of_fp16_input_returns_fp16",)),
    Wrong("rotate-drops-the-pass-through-dimensions", BACK, "return out.to(x.dtype)", ROTATE + PARTIAL),
    Wrong("rotate-pass-through-dimensions-zeroed", BACK,
          "return torch.cat([out, torch.zeros_like(xf[..., r:])], dim=-1).to(x.dtype)", ROTATE + PARTIAL),
    # rope_relative_score
    Wrong("relative-distance-sign-flipped", Q_AT, Q_AT.replace("[distance]", "[-distance]"), RELATIVE),
    Wrong("relative-no-rotation", "return (q_at.float() * k.float()).sum(-1)", "return (q.float() * k.float()).sum(-1)",
          RELATIVE),
    Wrong("relative-k-rotated-by-the-distance", "return (q_at.float() * k.float()).sum(-1)",
          "k_at = rope_rotate(k[:, None, :], torch.tensor([distance]), theta, convention)[:, 0]\n"
          "    return (q.float() * k_at.float()).sum(-1)", RELATIVE),
    Wrong("relative-theta-left-at-its-default", Q_AT, Q_AT.replace("theta, convention", "10000.0, convention"),
          RELATIVE),
    Wrong("relative-convention-left-at-its-default", Q_AT, Q_AT.replace("theta, convention", "theta"), RELATIVE),
    Wrong("relative-score-in-the-inputs-dtype", "return (q_at.float() * k.float()).sum(-1)", "return (q_at * k).sum(-1)",
          ("test_rope_relative_score_of_bf16_vectors_is_fp32",)),
    # rope_cached_decode
    Wrong("decode-slot-index-as-the-position", WHERE, "where = torch.tensor([k_cache.shape[2]])", WINDOW),
    Wrong("decode-position-off-by-one", WHERE, "where = torch.tensor([pos + 1])", DECODE + WINDOW),
    Wrong("decode-query-not-rotated", QK, "k = rope_rotate(k, where, theta, convention)", DECODE + WINDOW),
    Wrong("decode-key-stored-raw", QK, "q = rope_rotate(q, where, theta, convention)", DECODE + WINDOW),
    Wrong("decode-cached-keys-rotated-again", CACHES,
          "k_cache = rope_rotate(k_cache, torch.full((k_cache.shape[2],), pos), theta, convention)\n    " + CACHES,
          DECODE + WINDOW),
    Wrong("decode-value-rotated-too", QK, QK + "\n    v = rope_rotate(v, where, theta, convention)", DECODE + WINDOW),
    Wrong("decode-new-key-prepended", CACHES,
          "k_cache, v_cache = torch.cat([k, k_cache], dim=2), torch.cat([v, v_cache], dim=2)", DECODE + WINDOW),
    Wrong("decode-no-1/sqrt(D)", SCORES, SCORES.replace(" / math.sqrt(q.shape[-1])", ""), DECODE + WINDOW),
    Wrong("decode-scores-in-the-inputs-dtype", SCORES, SCORES.replace("q.float() @ k_cache.float()", "q @ k_cache"),
          DECODE_BF16),
    Wrong("decode-returns-fp32", "return out.to(q.dtype), k_cache, v_cache", "return out, k_cache, v_cache",
          DECODE_BF16),
    Wrong("decode-convention-left-at-its-default", QK, QK.replace("theta, convention", "theta"), DECODE + WINDOW),
    # rope_rerotate
    Wrong("rerotate-the-wrong-way", RE, RE.replace("delta)", "-delta)"), REROTATE + SINKS),
    Wrong("rerotate-ignores-rotary_dim", RE, RE.replace(", rotary_dim)", ")"), REROTATE),
    Wrong("rerotate-convention-left-at-its-default", RE, RE.replace("theta, convention, rotary_dim", "theta, rotary_dim=rotary_dim"),
          REROTATE + SINKS),
    Wrong("rerotate-by-slot-index-plus-delta", RE,
          "return rope_rotate(k_rot, torch.arange(k_rot.shape[-2]) + delta, theta, convention, rotary_dim)",
          REROTATE + SINKS),
    Wrong("rerotate-returns-fp32", RE, RE.replace("rotary_dim)", "rotary_dim).float()"),
          ("test_rope_rerotate_of_bf16_keys_returns_bf16",)),
    # rope_decode_flops
    Wrong("flops-queries-only", FLOP, "return 3 * r * cfg.n_heads * cfg.n_layers * batch", FLOPS),
    Wrong("flops-keys-of-n_heads", FLOP, "return 3 * r * 2 * cfg.n_heads * cfg.n_layers * batch", FLOPS),
    Wrong("flops-two-per-element", FLOP, FLOP.replace("3 * r", "2 * r"), FLOPS),
    Wrong("flops-four-per-element", FLOP, FLOP.replace("3 * r", "4 * r"), FLOPS),
    Wrong("flops-per-pair-not-per-element", FLOP, FLOP.replace("3 * r", "3 * (r // 2)"), FLOPS),
    Wrong("flops-one-layer", FLOP, FLOP.replace(" * cfg.n_layers", ""), FLOPS),
    Wrong("flops-batch-forgotten", FLOP, FLOP.replace(" * batch", ""), FLOPS[:1]),
    Wrong("flops-rotary_dim-ignored", "r = cfg.head_dim if rotary_dim is None else rotary_dim", "r = cfg.head_dim",
          FLOPS_PARTIAL),
    Wrong("flops-cos-sin-tables-counted", FLOP, FLOP + " + 2 * (r // 2) * cfg.n_layers", FLOPS),
    # alibi_slopes
    Wrong("slopes-2^(-8h/n)-stretched-to-any-n", LOW, "low = n_heads", SLOPES),
    Wrong("slopes-from-2^0", FIRST, FIRST.replace("(i + 1)", "i"), SLOPES),
    Wrong("slopes-extra-at-odd-indices", EXTRA, EXTRA.replace("range(0, ", "range(1, "), SLOPES),
    Wrong("slopes-extra-the-first-n-minus-p-of-2p", EXTRA, EXTRA.replace("range(0, 2 * (n_heads - low), 2)", "range(n_heads - low)"),
          SLOPES),
    Wrong("slopes-nearest-higher-power-of-two", LOW, "low = 2 ** math.ceil(math.log2(n_heads))", SLOPES),
    Wrong("slopes-halving-from-a-half", FIRST + "\n    " + EXTRA + "\n    return first + extra",
          "return [2.0 ** -(h + 1) for h in range(n_heads)]", SLOPES),
    Wrong("slopes-reversed", "return first + extra", "return (first + extra)[::-1]", SLOPES),
    Wrong("slopes-extra-before-the-first", "return first + extra", "return extra + first", SLOPES),
    # alibi_cached_decode
    Wrong("alibi-slot-index-as-the-distance", DISTANCE, "distance = torch.arange(T1, dtype=torch.float32)",
          ALIBI_DECODE),
    Wrong("alibi-bias-sign-flipped", BIAS, BIAS.replace("scores - ", "scores + "), ALIBI_DECODE),
    Wrong("alibi-heads-in-reverse-order", BIAS, BIAS.replace("slopes.float()", "slopes.float().flip(0)"), ALIBI_DECODE),
    Wrong("alibi-bias-divided-by-sqrt(D)-too",
          "scores = (q.float() @ k_cache.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, 1, T + 1)\n"
          "    " + BIAS,
          "scores = (q.float() @ k_cache.float().transpose(-2, -1) - slopes.float()[:, None, None] * distance) "
          "/ math.sqrt(q.shape[-1])", ALIBI_DECODE),
    Wrong("alibi-new-key-left-out",
          "k_cache, v_cache = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)  # (B, H, T + 1, D)\n"
          "    T1 = k_cache.shape[2]",
          "T1 = k_cache.shape[2] + 1", ALIBI_DECODE),
    Wrong("alibi-keys-stored-scaled-by-the-bias", "return out.to(q.dtype), k_cache, v_cache",
          "return out.to(q.dtype), k_cache * 1.0001, v_cache", ALIBI_DECODE),
    Wrong("alibi-scores-in-the-inputs-dtype", "scores = (q.float() @ k_cache.float().transpose(-2, -1))",
          "scores = (q @ k_cache.transpose(-2, -1))", ALIBI_BF16),
    Wrong("alibi-returns-fp32", "return out.to(q.dtype), k_cache, v_cache", "return out, k_cache, v_cache", ALIBI_BF16),
]

# The ALiBi entries edit the other module of the card.
WRONG = [w if not (w.id.startswith("slopes-") or w.id.startswith("alibi-")) else
         Wrong(w.id, w.old, w.new, w.caught_by, module=ALIBI) for w in WRONG]

# A second adversary's pass.
WRONG += [
    Wrong('rotate-angles-in-input-dtype-positions-int',
          'angles = input_pos.float()[:, None] * inv_freq  # (S, r/2)',
          'angles = input_pos[:, None] * inv_freq.to(x.dtype)  # (S, r/2)',
          ('test_rope_cached_decode_of_bf16_input_takes_its_scores_and_softmax_in_fp32', 'test_rope_rotate_of_bf16_input_at_long_positions_turns_by_the_exact_position')),
    Wrong('rotate-inv-freq-int-arange',
          'inv_freq = 1.0 / theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r)  # (r/2,)',
          'inv_freq = 1.0 / theta ** (torch.arange(0, r, 2) // r)  # (r/2,)',
          ('test_rope_cached_decode_equals_full_recompute_at_every_step', 'test_rope_cached_decode_in_a_sliding_window_rotates_by_position_not_slot')),
    Wrong('rotate-interleaved-via-half-on-a-permuted-view',
          '        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)',
          '        out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)',
          ('test_rope_cached_decode_equals_full_recompute_at_every_step', 'test_rope_cached_decode_in_a_sliding_window_rotates_by_position_not_slot')),
    Wrong('relative-key-at-distance',
          'q_at = rope_rotate(q[:, None, :], torch.tensor([distance]), theta, convention)[:, 0]',
          'q_at = rope_rotate(q[:, None, :], torch.tensor([abs(distance)]), theta, convention)[:, 0]',
          ('test_rope_relative_score_equals_scores_measured_at_many_absolute_positions',)),
    Wrong('decode-position-from-cache-length',
          'where = torch.tensor([pos])',
          'where = torch.tensor([k_cache.shape[2]])',
          ('test_rope_cached_decode_in_a_sliding_window_rotates_by_position_not_slot', 'test_rope_cached_decode_of_bf16_input_takes_its_scores_and_softmax_in_fp32')),
    Wrong('decode-softmax-over-heads',
          'out = torch.softmax(scores, dim=-1) @ v_cache.float()\n    return out.to(q.dtype), k_cache, v_cache\n\n\ndef rope_rerotate',
          'out = torch.softmax(scores, dim=1) @ v_cache.float()\n    return out.to(q.dtype), k_cache, v_cache\n\n\ndef rope_rerotate',
          ('test_rope_cached_decode_equals_full_recompute_at_every_step', 'test_rope_cached_decode_in_a_sliding_window_rotates_by_position_not_slot')),
    Wrong('rerotate-positions-from-0-plus-delta',
          'torch.full((k_rot.shape[-2],), delta)',
          'torch.arange(k_rot.shape[-2]) + delta',
          ('test_rope_rerotate_equals_rotating_the_raw_key_at_p_plus_delta', 'test_rope_rerotate_of_bf16_keys_returns_bf16')),
    Wrong('flops-kv-heads-only-times-2',
          'return 3 * r * (cfg.n_heads + cfg.n_kv_heads) * cfg.n_layers * batch',
          'return 3 * r * 2 * cfg.n_kv_heads * cfg.n_layers * batch',
          ('test_rope_decode_flops_match_the_ops_counted_in_a_cached_model_step', 'test_rope_decode_flops_of_llama_3_8b_are_a_rounding_error_next_to_its_matmuls')),
    Wrong('flops-n_heads-twice',
          'return 3 * r * (cfg.n_heads + cfg.n_kv_heads) * cfg.n_layers * batch',
          'return 3 * r * 2 * cfg.n_heads * cfg.n_layers * batch',
          ('test_rope_decode_flops_match_the_ops_counted_in_a_cached_model_step', 'test_rope_decode_flops_of_llama_3_8b_are_a_rounding_error_next_to_its_matmuls')),
    Wrong('slopes-power-of-two-only',
          '    return first + extra',
          '    return first + first[: n_heads - low]',
          ('test_alibi_slopes_equal_blooms_for_power_of_two_and_other_head_counts', 'test_alibi_slopes_of_8_and_12_heads_are_the_papers'), module='solutions/card06_positions/alibi.py'),
    Wrong('slopes-nearest-power-rounded',
          'low = 2 ** math.floor(math.log2(n_heads))',
          'low = 2 ** round(math.log2(n_heads))',
          ('test_alibi_slopes_equal_blooms_for_power_of_two_and_other_head_counts', 'test_alibi_slopes_of_8_and_12_heads_are_the_papers'), module='solutions/card06_positions/alibi.py'),
    Wrong('alibi-distance-from-slot-0',
          'distance = torch.arange(T1 - 1, -1, -1, dtype=torch.float32)',
          'distance = torch.arange(T1, dtype=torch.float32)',
          ('test_alibi_cached_decode_of_bf16_input_takes_its_scores_and_softmax_in_fp32', 'test_alibi_cached_decode_over_a_shifting_window_equals_attention_recomputed_from_positions'), module='solutions/card06_positions/alibi.py'),
    Wrong('alibi-bias-added',
          'scores = scores - slopes.float()[:, None, None] * distance',
          'scores = scores + slopes.float()[:, None, None] * distance',
          ('test_alibi_cached_decode_of_bf16_input_takes_its_scores_and_softmax_in_fp32', 'test_alibi_cached_decode_over_a_shifting_window_equals_attention_recomputed_from_positions'), module='solutions/card06_positions/alibi.py'),
    Wrong('alibi-slopes-over-batch',
          'scores = scores - slopes.float()[:, None, None] * distance',
          'scores = scores - slopes.float()[:, None, None, None] * distance',
          ('test_alibi_cached_decode_of_bf16_input_takes_its_scores_and_softmax_in_fp32', 'test_alibi_cached_decode_over_a_shifting_window_equals_attention_recomputed_from_positions'), module='solutions/card06_positions/alibi.py'),
]

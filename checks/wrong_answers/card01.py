"""card01's plausible wrong answers, each with the tests written to catch it (checks/test_alternatives.py)."""

from wrong_answers import Wrong

SOLUTION = "solutions/card01_redundancy/redundancy.py"

TP_HOOKS = "test_token_passes_match_the_rows_hooks_count_per_layer_and_sequence"
TP_1000 = "test_token_passes_for_a_1000_token_prompt_and_a_100_token_answer"
ROWS = "test_kv_projection_rows_count_k_and_v_in_every_layer_and_sequence"
RF = "test_redundant_fraction_is_what_a_cache_saves_at_each_pass"
RF_FLOAT = "test_redundant_fraction_is_a_float_at_every_pass_the_prompts_included"
FF = "test_forward_flops_match_flop_counter_mode_on_a_real_forward_pass"
FF_70B = "test_forward_flops_of_one_llama_2_70b_token_after_4095_cached"
GF = "test_generation_flops_match_flop_counter_mode_over_a_whole_generation"
GF_GROWS = "test_a_cached_step_still_costs_more_as_the_sequence_grows"

CACHED = "return prompt_len + (n_new - 1)  # the prompt once, then one token per later pass"
UNCACHED = "return n_new * prompt_len + n_new * (n_new - 1) // 2"
FED = "fed = prompt_len + step  # the uncached pass reprojects the whole sequence so far"
NEW = "new = prompt_len if step == 0 else 1  # a cache would have projected only these"
PER_LAYER = "per_layer = d * H * D + 2 * d * Hkv * D + H * D * d + 3 * d * cfg.d_ff"
SCORES = "scores = 4 * cfg.n_layers * batch * H * n_new * T * D"
STEPS = "steps = sum(forward_flops(cfg, batch, 1, prompt_len + i - 1) for i in range(1, n_new))"

WRONG = [
    # --- token_passes --------------------------------------------------------------------------------
    Wrong("cached-forgets-the-prompts-prefill", CACHED, "return n_new", (TP_HOOKS, TP_1000)),
    Wrong("cached-feeds-back-the-last-token", CACHED, "return prompt_len + n_new", (TP_HOOKS, TP_1000)),
    Wrong("cached-counts-a-step-even-for-one-new-token", CACHED, "return prompt_len + n_new - 1 if n_new > 1 else prompt_len + 1",
          (TP_HOOKS,)),
    Wrong("uncached-n(n+1)/2", UNCACHED, "return n_new * prompt_len + n_new * (n_new + 1) // 2", (TP_HOOKS, TP_1000)),
    Wrong("uncached-the-widely-shared-55000", UNCACHED, "return n_new * (prompt_len + n_new) // 2", (TP_HOOKS, TP_1000)),
    Wrong("uncached-every-pass-at-the-final-length", UNCACHED, "return n_new * (prompt_len + n_new - 1)", (TP_HOOKS, TP_1000)),
    Wrong("uncached-a-float-from-true-division", UNCACHED, "return n_new * prompt_len + n_new * (n_new - 1) / 2",
          (TP_HOOKS, TP_1000)),
    Wrong("uncached-one-pass-too-many", UNCACHED, "return (n_new + 1) * prompt_len + (n_new + 1) * n_new // 2",
          (TP_HOOKS, TP_1000)),
    Wrong("uncached-triangle-from-position-1", UNCACHED,
          "return (prompt_len + n_new - 1) * (prompt_len + n_new) // 2", (TP_HOOKS, TP_1000)),
    # --- kv_projection_rows --------------------------------------------------------------------------
    Wrong("rows-k-only", "return 2 * cfg.n_layers * batch * token_passes", "return cfg.n_layers * batch * token_passes",
          (ROWS,)),
    Wrong("rows-one-layer", "return 2 * cfg.n_layers * batch * token_passes", "return 2 * batch * token_passes", (ROWS,)),
    Wrong("rows-one-sequence", "return 2 * cfg.n_layers * batch * token_passes", "return 2 * cfg.n_layers * token_passes",
          (ROWS,)),
    Wrong("rows-per-kv-head", "return 2 * cfg.n_layers * batch * token_passes",
          "return 2 * cfg.n_layers * batch * cfg.n_kv_heads * token_passes", (ROWS,)),
    Wrong("rows-per-query-head", "return 2 * cfg.n_layers * batch * token_passes",
          "return 2 * cfg.n_layers * batch * cfg.n_heads * token_passes", (ROWS,)),
    Wrong("rows-of-the-final-cache-either-way", "token_passes(prompt_len, n_new, use_cache)  # K and V",
          "(prompt_len + n_new - 1)  # K and V", (ROWS,)),
    # --- redundant_fraction --------------------------------------------------------------------------
    Wrong("fraction-step-over-length", "return (fed - new) / fed", "return step / fed", (RF, RF_FLOAT)),
    Wrong("fraction-ignores-the-prefill", NEW, "new = 1", (RF, RF_FLOAT)),
    Wrong("fraction-the-new-share", "return (fed - new) / fed", "return new / fed", (RF, RF_FLOAT)),
    Wrong("fraction-floor-division", "return (fed - new) / fed", "return (fed - new) // fed", (RF, RF_FLOAT)),
    Wrong("fraction-length-off-by-one", FED, "fed = prompt_len + step + 1", (RF, RF_FLOAT)),
    Wrong("fraction-an-int-0-at-the-prefill", FED, "if step == 0:\n        return 0\n    " + FED, (RF_FLOAT,)),
    Wrong("fraction-as-a-percentage", "return (fed - new) / fed", "return 100 * (fed - new) / fed", (RF, RF_FLOAT)),
    # --- forward_flops -------------------------------------------------------------------------------
    Wrong("k-and-v-projections-with-n_heads", PER_LAYER, PER_LAYER.replace("2 * d * Hkv * D", "2 * d * H * D"), (FF, FF_70B)),
    Wrong("k-and-v-projection-counted-once", PER_LAYER, PER_LAYER.replace("2 * d * Hkv * D", "d * Hkv * D"), (FF, FF_70B)),
    Wrong("q-and-o-projections-d-by-d", PER_LAYER, PER_LAYER.replace("d * H * D + 2 * d * Hkv * D + H * D * d",
                                                                     "d * d + 2 * d * Hkv * D + d * d"), (FF,)),
    Wrong("a-two-matrix-mlp", PER_LAYER, PER_LAYER.replace("3 * d * cfg.d_ff", "2 * d * cfg.d_ff"), (FF, FF_70B)),
    Wrong("no-lm_head", "weights = cfg.n_layers * per_layer + d * cfg.vocab_size", "weights = cfg.n_layers * per_layer",
          (FF, FF_70B)),
    Wrong("the-embedding-counted-as-a-matmul", "weights = cfg.n_layers * per_layer + d * cfg.vocab_size",
          "weights = cfg.n_layers * per_layer + 2 * d * cfg.vocab_size", (FF, FF_70B)),
    Wrong("lm_head-on-the-last-position-only", "dense = 2 * batch * n_new * weights",
          "dense = 2 * batch * (n_new * (weights - d * cfg.vocab_size) + d * cfg.vocab_size)", (FF,)),
    Wrong("one-flop-per-multiply-add", "dense = 2 * batch * n_new * weights", "dense = batch * n_new * weights", (FF, FF_70B)),
    Wrong("scores-over-the-cached-keys-only", "    T = n_cached + n_new\n", "    T = n_cached\n", (FF, FF_70B)),
    Wrong("scores-over-one-key-too-many", "    T = n_cached + n_new\n", "    T = n_cached + n_new + 1\n", (FF, FF_70B)),
    Wrong("scores-with-n_kv_heads", SCORES, SCORES.replace("* H *", "* Hkv *"), (FF, FF_70B)),
    Wrong("scores-q-k-only", SCORES, SCORES.replace("4 *", "2 *"), (FF, FF_70B)),
    Wrong("scores-in-one-layer", SCORES, SCORES.replace("cfg.n_layers * ", ""), (FF, FF_70B)),
    Wrong("scores-of-one-sequence", SCORES, SCORES.replace("batch * ", ""), (FF,)),
    Wrong("scores-only-the-unmasked-causal-triangle", SCORES,
          "scores = 4 * cfg.n_layers * batch * H * (n_new * n_cached + n_new * (n_new + 1) // 2) * D", (FF,)),
    Wrong("kaplans-average-context-for-the-scores", SCORES, "scores = 2 * cfg.n_layers * batch * H * n_new * T * D", (FF, FF_70B)),
    # --- generation_flops ----------------------------------------------------------------------------
    Wrong("cached-steps-see-one-key-too-many", STEPS, STEPS.replace("prompt_len + i - 1", "prompt_len + i"), (GF, GF_GROWS)),
    Wrong("cached-one-step-too-many", STEPS, STEPS.replace("range(1, n_new)", "range(1, n_new + 1)"), (GF,)),
    Wrong("cached-every-step-costs-the-first", STEPS, "steps = (n_new - 1) * forward_flops(cfg, batch, 1, prompt_len)",
          (GF, GF_GROWS)),
    Wrong("cached-every-step-costs-the-last", STEPS, "steps = (n_new - 1) * forward_flops(cfg, batch, 1, prompt_len + n_new - 2)",
          (GF, GF_GROWS)),
    Wrong("cached-forgets-the-prefill", "return forward_flops(cfg, batch, prompt_len, 0) + steps", "return steps", (GF,)),
    Wrong("cached-prefill-as-one-token-steps", "return forward_flops(cfg, batch, prompt_len, 0) + steps",
          "return sum(forward_flops(cfg, batch, 1, j) for j in range(prompt_len)) + steps", (GF,)),
    Wrong("flops-uncached-one-pass-too-many", "for i in range(n_new))", "for i in range(n_new + 1))", (GF,)),
    Wrong("flops-uncached-passes-from-one-more-token", "forward_flops(cfg, batch, prompt_len + i, 0)",
          "forward_flops(cfg, batch, prompt_len + i + 1, 0)", (GF,)),
    Wrong("flops-uncached-as-one-token-steps", "forward_flops(cfg, batch, prompt_len + i, 0)",
          "forward_flops(cfg, batch, 1, prompt_len + i - 1)", (GF,)),
    Wrong('fraction-int-zero-at-the-prompt',
          '    return (fed - new) / fed',
          '    return 0 if step == 0 else (fed - new) / fed',
          ('test_redundant_fraction_is_a_float_at_every_pass_the_prompts_included',)),
    Wrong('fraction-of-the-prompt-only',
          '    return (fed - new) / fed',
          '    return (fed - new) / fed if step < 2 else (prompt_len) / fed',
          ('test_redundant_fraction_is_a_float_at_every_pass_the_prompts_included', 'test_redundant_fraction_is_what_a_cache_saves_at_each_pass')),
    Wrong('passes-cached-n-new',
          'return prompt_len + (n_new - 1)',
          'return prompt_len + n_new',
          ('test_kv_projection_rows_count_k_and_v_in_every_layer_and_sequence', 'test_token_passes_for_a_1000_token_prompt_and_a_100_token_answer')),
    Wrong('forward-scores-of-the-cache-only',
          '    T = n_cached + n_new\n    dense',
          '    T = max(n_cached, 1)\n    dense',
          ('test_a_cached_step_still_costs_more_as_the_sequence_grows', 'test_forward_flops_match_flop_counter_mode_on_a_real_forward_pass')),
    Wrong('forward-gqa-kv-of-n_heads-in-scores-only',
          'scores = 4 * cfg.n_layers * batch * H * n_new * T * D',
          'scores = 4 * cfg.n_layers * batch * Hkv * n_new * T * D',
          ('test_a_cached_step_still_costs_more_as_the_sequence_grows', 'test_forward_flops_match_flop_counter_mode_on_a_real_forward_pass')),
]

"""card07's plausible wrong answers, each with the tests written to catch it (checks/test_alternatives.py)."""

from wrong_answers import Wrong

SOLUTION = "solutions/card07_distributed/sharding.py"

HEADS = ("test_kv_heads_of_rank_are_the_heads_each_ranks_cache_holds_in_a_gloo_run",
         "test_kv_heads_of_rank_are_those_its_contiguous_query_heads_read")
COPIES = ("test_kv_replication_is_how_many_ranks_cache_each_head_in_a_gloo_run",
          "test_kv_replication_counts_the_copies_over_every_valid_layout")
RANK_BYTES = ("test_kv_bytes_per_rank_match_nbytes_of_each_ranks_cache_in_a_gloo_run",
              "test_kv_bytes_per_rank_of_real_presets_match_a_meta_allocated_shard")
STAGE_BYTES = ("test_pipeline_kv_bytes_per_stage_match_each_stages_cache_in_a_gloo_run",
               "test_pipeline_kv_bytes_per_stage_of_real_presets_summed_over_the_stages")
SENT = ("test_pipeline_bytes_sent_per_step_are_what_stage_0_sent_each_step_of_a_gloo_run",
        "test_pipeline_bytes_sent_per_step_of_real_presets")
PLAN = ("test_reshard_plan_run_in_gloo_resumes_decoding_with_unchanged_logits",
        "test_reshard_plan_moves_each_missing_head_once_from_a_holder_it_spreads_over")
SECONDS = ("test_reshard_seconds_price_the_messages_a_gloo_reshard_sent_and_received",
           "test_reshard_seconds_of_real_presets_price_the_busiest_link")

RANK_BYTES_RETURN = "return 2 * cfg.n_layers * batch * seq_len * heads * cfg.head_dim * dtype.itemsize"
STAGE_RETURN = "return 2 * layers * batch * seq_len * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize"
SENT_RETURN = "return batch * cfg.d_model * dtype.itemsize"
SRC = "src = min(holders[h], key=lambda g: (sends[g], g))"
MOVES = "moves = max(sum(src == g for _, src, _ in plan), sum(dst == g for _, _, dst in plan))"
SECONDS_RETURN = "return busiest * 2 * cfg.n_layers * (alpha + message / beta)"

WRONG = [
    # kv_heads_of_rank
    Wrong("heads-replicas-round-robin", "return [rank // (tp // n_kv_heads)]", "return [rank % n_kv_heads]", HEADS),
    Wrong("heads-strided-not-contiguous", "return list(range(rank * per, (rank + 1) * per))",
          "return list(range(rank, n_kv_heads, tp))", HEADS),
    Wrong("heads-one-too-many", "return list(range(rank * per, (rank + 1) * per))",
          "return list(range(rank * per, min((rank + 1) * per + 1, n_kv_heads)))", HEADS),
    Wrong("heads-none-when-fewer-heads-than-ranks", "return [rank // (tp // n_kv_heads)]", "return []", HEADS),
    Wrong("heads-replica-from-the-highest-head", "return [rank // (tp // n_kv_heads)]",
          "return [n_kv_heads - 1 - rank // (tp // n_kv_heads)]", HEADS),
    Wrong("heads-a-range-not-a-list", "return list(range(rank * per, (rank + 1) * per))",
          "return range(rank * per, (rank + 1) * per)", HEADS),
    # kv_replication
    Wrong("copies-tp-over-hkv-unfloored", "return max(1, tp // n_kv_heads)", "return tp // n_kv_heads", COPIES),
    Wrong("copies-a-float", "return max(1, tp // n_kv_heads)", "return max(1, tp / n_kv_heads)", COPIES),
    Wrong("copies-hkv-over-tp", "return max(1, tp // n_kv_heads)", "return max(1, n_kv_heads // tp)", COPIES),
    Wrong("copies-always-one", "return max(1, tp // n_kv_heads)", "return 1", COPIES),
    Wrong("copies-tp", "return max(1, tp // n_kv_heads)", "return tp", COPIES),
    # kv_bytes_per_rank
    Wrong("rank-bytes-fractional-heads", "heads = max(1, cfg.n_kv_heads // tp)", "heads = cfg.n_kv_heads / tp",
          RANK_BYTES),
    Wrong("rank-bytes-no-floor-of-one-head", "heads = max(1, cfg.n_kv_heads // tp)", "heads = cfg.n_kv_heads // tp",
          RANK_BYTES),
    Wrong("rank-bytes-query-heads", "heads = max(1, cfg.n_kv_heads // tp)", "heads = max(1, cfg.n_heads // tp)",
          RANK_BYTES),
    Wrong("rank-bytes-K-and-V-counted-once", RANK_BYTES_RETURN, RANK_BYTES_RETURN.replace("2 * cfg", "cfg"), RANK_BYTES),
    Wrong("rank-bytes-layers-split-over-ranks", RANK_BYTES_RETURN,
          RANK_BYTES_RETURN.replace("cfg.n_layers", "(cfg.n_layers // tp)"), RANK_BYTES),
    Wrong("rank-bytes-batch-forgotten", RANK_BYTES_RETURN, RANK_BYTES_RETURN.replace("batch * ", ""), RANK_BYTES),
    Wrong("rank-bytes-2-bytes-whatever-the-dtype", RANK_BYTES_RETURN, RANK_BYTES_RETURN.replace("dtype.itemsize", "2"),
          RANK_BYTES),
    Wrong("rank-bytes-all-heads", "heads = max(1, cfg.n_kv_heads // tp)", "heads = cfg.n_kv_heads", RANK_BYTES),
    # pipeline_kv_bytes_per_stage
    Wrong("stage-bytes-every-stage-holds-every-layer", "layers = cfg.n_layers // stages", "layers = cfg.n_layers",
          STAGE_BYTES),
    Wrong("stage-bytes-query-heads", STAGE_RETURN, STAGE_RETURN.replace("n_kv_heads", "n_heads"), STAGE_BYTES),
    Wrong("stage-bytes-K-and-V-counted-once", STAGE_RETURN, STAGE_RETURN.replace("2 * layers", "layers"), STAGE_BYTES),
    Wrong("stage-bytes-earlier-layers-too", "layers = cfg.n_layers // stages", "layers = cfg.n_layers - cfg.n_layers // stages",
          STAGE_BYTES[1:]),  # the gloo run has 2 stages, where L - L/2 = L/2
    # pipeline_bytes_sent_per_step
    Wrong("sent-H-times-D-not-d_model", SENT_RETURN, "return batch * cfg.n_heads * cfg.head_dim * dtype.itemsize",
          SENT[:1]),  # every real preset has H·D = d_model
    Wrong("sent-the-new-tokens-K-and-V", SENT_RETURN,
          "return 2 * batch * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize", SENT),
    Wrong("sent-batch-forgotten", SENT_RETURN, "return cfg.d_model * dtype.itemsize", SENT),
    Wrong("sent-2-bytes-whatever-the-dtype", SENT_RETURN, "return batch * cfg.d_model * 2", SENT),
    Wrong("sent-the-stages-whole-kv-cache", SENT_RETURN,
          "return batch * 2 * (cfg.n_layers // 2) * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize", SENT),
    # reshard_plan
    Wrong("plan-always-from-the-first-holder", SRC, "src = holders[h][0]", PLAN[1:]),
    Wrong("plan-from-the-busiest-holder", SRC, "src = max(holders[h], key=lambda g: (sends[g], g))", PLAN[1:]),
    Wrong("plan-sends-heads-the-gpu-already-holds", "            if h not in held:\n",
          "            if True:\n", PLAN),
    Wrong("plan-held-read-from-the-new-layout", "held = kv_heads_of_rank(n_kv_heads, tp_from, dst) if dst < tp_from else []",
          "held = kv_heads_of_rank(n_kv_heads, tp_to, dst) if dst < tp_from else []", PLAN),
    Wrong("plan-new-gpus-assumed-to-hold-their-heads",
          "held = kv_heads_of_rank(n_kv_heads, tp_from, dst) if dst < tp_from else []",
          "held = kv_heads_of_rank(n_kv_heads, tp_from, min(dst, tp_from - 1))", PLAN),
    Wrong("plan-destinations-of-the-old-layout", "for dst in range(tp_to):", "for dst in range(min(tp_from, tp_to)):",
          PLAN),
    # reshard_seconds
    Wrong("seconds-sum-over-gpus", "busiest = max(busiest, moves)", "busiest = busiest + moves", SECONDS),
    Wrong("seconds-sends-only", MOVES, "moves = sum(src == g for _, src, _ in plan)", SECONDS),
    Wrong("seconds-receives-only", MOVES, "moves = sum(dst == g for _, _, dst in plan)", SECONDS),
    Wrong("seconds-half-duplex", MOVES,
          "moves = sum(src == g for _, src, _ in plan) + sum(dst == g for _, _, dst in plan)", SECONDS),
    Wrong("seconds-K-without-V", SECONDS_RETURN, "return busiest * cfg.n_layers * (alpha + message / beta)", SECONDS),
    Wrong("seconds-alpha-once-per-move", SECONDS_RETURN,
          "return busiest * (alpha + 2 * cfg.n_layers * message / beta)", SECONDS),
    Wrong("seconds-K-and-V-in-one-message", SECONDS_RETURN,
          "return busiest * cfg.n_layers * (alpha + 2 * message / beta)", SECONDS),
    Wrong("seconds-every-move-in-sequence", "busiest = max(busiest, moves)", "busiest = len(plan)", SECONDS),
    Wrong("seconds-message-without-the-batch", "message = batch * seq_len * cfg.head_dim * dtype.itemsize",
          "message = seq_len * cfg.head_dim * dtype.itemsize", SECONDS),
    Wrong("seconds-message-of-every-kv-head", "message = batch * seq_len * cfg.head_dim * dtype.itemsize",
          "message = batch * seq_len * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize", SECONDS),
    Wrong('heads-replica-of-rank-mod',
          'return [rank // (tp // n_kv_heads)]',
          'return [rank % n_kv_heads]',
          ('test_kv_heads_of_rank_are_the_heads_each_ranks_cache_holds_in_a_gloo_run', 'test_kv_heads_of_rank_are_those_its_contiguous_query_heads_read')),
    Wrong('sent-both-directions',
          'return batch * cfg.d_model * dtype.itemsize',
          'return 2 * batch * cfg.d_model * dtype.itemsize',
          ('test_pipeline_bytes_sent_per_step_are_what_stage_0_sent_each_step_of_a_gloo_run', 'test_pipeline_bytes_sent_per_step_of_real_presets')),
    Wrong('seconds-one-message-per-move',
          'return busiest * 2 * cfg.n_layers * (alpha + message / beta)',
          'return busiest * (alpha + 2 * cfg.n_layers * message / beta)',
          ('test_reshard_seconds_of_real_presets_price_the_busiest_link', 'test_reshard_seconds_price_the_messages_a_gloo_reshard_sent_and_received')),
]

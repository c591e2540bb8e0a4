"""Model configuration: one frozen dataclass, and the published shapes of real models.

Every KV-cache quantity in the katas is a function of a handful of numbers: layers,
KV heads, head dim, and the bytes of one element. The presets carry those numbers as the released
configurations (config.json, params.json) give them, with the papers for what the configurations
leave implicit, so that a kata can ask about a real system. The sources are in the comment above
the presets.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256          # tokens the embedding and the LM head know
    n_layers: int = 2              # L: decoder blocks, each with its own K/V cache
    d_model: int = 64              # width of the residual stream
    n_heads: int = 4               # H: query heads
    n_kv_heads: int | None = None  # Hkv: key/value heads (None means MHA: Hkv = H)
    head_dim: int | None = None    # D: None means d_model // n_heads
    d_ff: int | None = None        # MLP hidden width, per expert (None: Llama's rule for SwiGLU, 4·d_model for GELU)
    mlp: str = "swiglu"            # "swiglu": gate, up, down (Llama); "gelu": up, down (GPT-2/3)
    rope_theta: float = 10000.0    # RoPE base
    norm_eps: float = 1e-5         # RMSNorm epsilon
    max_seq_len: int = 2048        # positions the model is meant for
    # Multi-head latent attention (DeepSeek-V2/V3) caches a latent and a decoupled RoPE key
    # instead of per-head K and V. Zero means the model uses ordinary (GQA/MHA) attention.
    mla_latent_dim: int = 0
    mla_rope_dim: int = 0
    mla_q_rank: int = 0            # DeepSeek's q_lora_rank: queries through a d -> rank -> heads bottleneck (0: one q_proj)
    # Mixture of experts (Mixtral, DeepSeek): each layer holds n_experts routed MLPs of width d_ff and a
    # router that sends each token to experts_per_token of them. Zero means one dense MLP per layer.
    n_experts: int = 0
    experts_per_token: int = 0
    # DeepSeekMoE (built with MLA only, by kvref.mla): shared experts every token goes through,
    # beside the routed ones, and a first few layers that keep one dense MLP of width dense_d_ff.
    n_shared_experts: int = 0
    first_dense_layers: int = 0
    dense_d_ff: int | None = None  # None: d_ff
    sliding_window: int = 0        # W: a token attends to the last W positions only (0: no window)
    tie_embeddings: bool = False   # lm_head shares the embedding matrix (GPT-2/3)
    n_params: int | None = field(default=None, compare=False)  # published total, where known
    name: str = field(default="", compare=False)  # the preset's name, for printing

    def __post_init__(self) -> None:
        n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        head_dim = self.d_model // self.n_heads if self.head_dim is None else self.head_dim
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"ModelConfig.mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        d_ff = self.d_ff
        if d_ff is None:
            d_ff = _swiglu_hidden(self.d_model) if self.mlp == "swiglu" else 4 * self.d_model
        # Derived fields are computed once, here, so every reader sees the same numbers.
        object.__setattr__(self, "n_kv_heads", n_kv_heads)
        object.__setattr__(self, "head_dim", head_dim)
        object.__setattr__(self, "d_ff", d_ff)
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"ModelConfig.{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {value}")
        if self.n_heads % n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({n_kv_heads}): "
                "each KV head serves a whole group of query heads"
            )
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE's rotation pairs, got {head_dim}")
        for name in ("mla_latent_dim", "mla_rope_dim", "n_experts", "experts_per_token", "sliding_window",
                     "mla_q_rank", "n_shared_experts", "first_dense_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be an int >= 0, got {value!r}")
        if (self.n_experts == 0) != (self.experts_per_token == 0) or self.experts_per_token > self.n_experts:
            raise ValueError(f"experts_per_token ({self.experts_per_token}) must be between 1 and n_experts "
                             f"({self.n_experts}), or both 0 for a dense MLP")
        if self.dense_d_ff is not None and (not isinstance(self.dense_d_ff, int) or isinstance(self.dense_d_ff, bool)
                                            or self.dense_d_ff < 1):
            raise ValueError(f"ModelConfig.dense_d_ff must be an int >= 1 or None, got {self.dense_d_ff!r}")
        deepseek = {n: getattr(self, n) for n in ("mla_q_rank", "n_shared_experts", "first_dense_layers", "dense_d_ff")
                    if getattr(self, n)}
        if deepseek and not self.mla_latent_dim:
            raise ValueError(f"{', '.join(deepseek)} are DeepSeek's: kvref builds them with MLA only (mla_latent_dim > 0)")
        if (self.n_shared_experts or self.first_dense_layers) and not self.n_experts:
            raise ValueError("n_shared_experts and first_dense_layers need routed experts (n_experts > 0)")
        if self.first_dense_layers > self.n_layers:
            raise ValueError(f"first_dense_layers ({self.first_dense_layers}) must be at most n_layers ({self.n_layers})")
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"ModelConfig.tie_embeddings must be a bool, got {type(self.tie_embeddings).__name__}")

    def __repr__(self) -> str:
        """One line: a preset by its name, any other config by the fields that differ from the defaults."""
        if self.name and PRESETS.get(self.name) == self:
            return f"preset({self.name!r})"
        shown = ["vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"]
        defaults = ModelConfig()
        shown += [f.name for f in fields(self) if f.name not in shown and f.compare
                  and getattr(self, f.name) != getattr(defaults, f.name)]
        return f"ModelConfig({', '.join(f'{n}={getattr(self, n)!r}' for n in shown)})"

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(repr(self))  # hypothesis prints drawn arguments with this: keep them on one line

    @property
    def group_size(self) -> int:
        """G: query heads that share one KV head (1 for MHA, n_heads for MQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def is_mla(self) -> bool:
        return self.mla_latent_dim > 0

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def with_(self, **changes) -> "ModelConfig":
        """A copy with some fields changed.

        `n_kv_heads`, `head_dim` and `d_ff` keep their values unless changed too: they were
        filled in when this config was made, so `replace` cannot tell them from given ones.
        The copy is no longer a preset: it prints its fields, not the preset's name.
        """
        return replace(self, name="", **changes)


def _swiglu_hidden(d_model: int) -> int:
    # Llama's rule: 2/3 of 4·d_model, rounded up to a multiple of 8 (kept small for toys).
    hidden = int(2 * 4 * d_model / 3)
    return 8 * ((hidden + 7) // 8)


# Published shapes, from each model's released configuration (Hugging Face config.json, Meta's
# params.json), which is where layers, heads, KV heads and widths are given:
# - Llama 2: meta-llama/Llama-2-{7b,70b}-hf config.json (70B: num_hidden_layers 80, hidden_size 8192,
#   num_attention_heads 64, num_key_value_heads 8, intermediate_size 28672; 7B: 32 layers, 32 heads,
#   32 KV heads). Touvron et al. 2023 (Llama 2) §A.2.1 gives the 70B's grouped-query attention with
#   8 KV heads; its Table 1 lists only context length (4,096) and whether a size uses GQA.
#   Llama-2-7B is MHA: some copies of its config wrongly list 8 KV heads.
# - Llama 3 / 3.1: meta-llama/Meta-Llama-3-{8B,70B} and Llama-3.1-70B config.json (the model cards
#   give sizes, context and GQA, not shapes; 3.1: 128k context; kvref models no RoPE scaling).
# - mistral-7b is Mistral-7B-v0.1: its config.json (sliding_window 4096, max_position_embeddings
#   32768, rope_theta 1e4). The paper (Jiang et al. 2023, Table 1) gives window_size 4096 and
#   context_len 8192: 32,768 is v0.1's max_position_embeddings, not a trained context. v0.2 and
#   v0.3 have no sliding window (sliding_window null) and rope_theta 1e6.
# - Mixtral of Experts (Jiang et al. 2024: 8 experts, top-2, 32k context, no sliding window; it rounds
#   to 47B total, 13B active: 46.7B and 12.9B are Mistral AI's release post) and
#   mistralai/Mixtral-8x7B-v0.1 config.json.
# - GPT-3 (Brown et al. 2020, Table 2.1: 96 layers, d 12288, 96 heads of 128; §2.1: context 2048 and the
#   GPT-2 architecture: a two-matrix GELU MLP of 4·d, tied input/output embeddings; §2.1 also alternates
#   dense and locally banded sparse attention layers, whose band is not published: kvref makes every layer dense).
# - DeepSeek-V2 (arXiv 2405.04434, §3.1.2) and DeepSeek-V3 (arXiv 2412.19437, §4.2) hyper-parameters,
#   and deepseek-ai/DeepSeek-V2 and DeepSeek-V3 config.json: MLA (kv_lora_rank 512, qk_rope_head_dim
#   64, qk_nope_head_dim = v_head_dim = 128, q_lora_rank 1536) and DeepSeekMoE. V2: 60 layers, d 5120,
#   160 routed experts + 2 shared, top-6, expert width (moe_intermediate_size) 1,536, the first layer
#   dense (first_k_dense_replace 1, intermediate_size 12,288); 236B total, 21B active. V3: 61 layers,
#   d 7168, 256 routed + 1 shared, top-8, width 2,048, the first 3 layers dense (18,432); 671B total
#   (685B with the multi-token-prediction module, not modelled), 37B active. kvref builds both at
#   235.74e9 and 671.03e9 (kvref.mla.MLATransformer on the meta device; V3's 14,848 router
#   score biases are left out). Context: the papers' 128K (131,072); the config.json files say
#   163,840, YaRN's factor 40 over the 4,096 trained.
# kvref builds every dense model Llama-style (RoPE, RMSNorm, no biases): for GPT-3 that drops its
# learned positions and biases (40.5M parameters), 174.57e9 against 174.60e9.
_PRESETS = [
    ModelConfig(vocab_size=32000, n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32,
                d_ff=11008, max_seq_len=4096, n_params=6_738_415_616, name="llama-2-7b"),
    ModelConfig(vocab_size=32000, n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8,
                d_ff=28672, max_seq_len=4096, n_params=68_976_648_192, name="llama-2-70b"),
    ModelConfig(vocab_size=128256, n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8,
                d_ff=14336, rope_theta=500000.0, max_seq_len=8192, n_params=8_030_261_248, name="llama-3-8b"),
    ModelConfig(vocab_size=128256, n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8,
                d_ff=28672, rope_theta=500000.0, max_seq_len=8192, n_params=70_553_706_496, name="llama-3-70b"),
    ModelConfig(vocab_size=128256, n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8,
                d_ff=28672, rope_theta=500000.0, max_seq_len=131072, n_params=70_553_706_496, name="llama-3.1-70b"),
    ModelConfig(vocab_size=32000, n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8,  # Mistral-7B-v0.1
                d_ff=14336, max_seq_len=32768, sliding_window=4096, n_params=7_241_732_096, name="mistral-7b"),
    ModelConfig(vocab_size=32000, n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8,
                d_ff=14336, rope_theta=1e6, max_seq_len=32768, n_experts=8, experts_per_token=2,
                n_params=46_702_792_704, name="mixtral-8x7b"),
    ModelConfig(vocab_size=50257, n_layers=96, d_model=12288, n_heads=96, n_kv_heads=96,
                d_ff=4 * 12288, mlp="gelu", tie_embeddings=True, max_seq_len=2048,
                n_params=175_000_000_000, name="gpt-3-175b"),
    ModelConfig(vocab_size=102400, n_layers=60, d_model=5120, n_heads=128, n_kv_heads=128,
                head_dim=128, max_seq_len=131072, mla_latent_dim=512, mla_rope_dim=64, mla_q_rank=1536,
                d_ff=1536, n_experts=160, experts_per_token=6, n_shared_experts=2,
                first_dense_layers=1, dense_d_ff=12288, n_params=236_000_000_000, name="deepseek-v2"),
    ModelConfig(vocab_size=129280, n_layers=61, d_model=7168, n_heads=128, n_kv_heads=128,
                head_dim=128, max_seq_len=131072, mla_latent_dim=512, mla_rope_dim=64, mla_q_rank=1536,
                d_ff=2048, n_experts=256, experts_per_token=8, n_shared_experts=1,
                first_dense_layers=3, dense_d_ff=18432, n_params=671_000_000_000, name="deepseek-v3"),
]
PRESETS: dict[str, ModelConfig] = {cfg.name: cfg for cfg in _PRESETS}


def preset(name: str) -> ModelConfig:
    """Look up a real model's configuration by name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None

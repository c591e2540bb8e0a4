"""Train kvref's small decoder on the Python standard library's own source, bytes as tokens (issue 8, item 5).

    python bench/train_tiny_decoder.py [--steps 320] [--batch 8] [--seq-len 512]

Eviction policies differ in quality only on trained attention; random weights attend almost
uniformly. This trains `kvref.model.build_model` (4 layers, d_model 128, 4 query heads over 2 KV
heads, RoPE, byte vocabulary of 256) on text every machine with Python has: the `.py` files of
`sysconfig.get_paths()['stdlib']`, without `test/`, `tests/`, `idlelib/` and installed packages.
The sorted file list is split by index: every 10th file is held out for evaluation.

It writes bench/weights/tiny_decoder.pt (state_dict in fp16), tiny_decoder.json (the config, the
command, the corpus, the loss curve, the wall time, the held-out loss). One thread, CPU only.
Different Python versions ship different stdlibs: the json records which one trained the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvref.config import ModelConfig  # noqa: E402
from kvref.model import build_model  # noqa: E402

WEIGHTS = ROOT / "bench" / "weights"
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
HOLDOUT_EVERY = 10  # file i is held out when i % 10 == 0
CONFIG = ModelConfig(vocab_size=256, n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, max_seq_len=512)


def stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib's .py files, sorted by their path inside the stdlib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not SKIP_DIRS & set(f.relative_to(root).parts[:-1])]
    return root, sorted(files, key=lambda f: f.relative_to(root).as_posix())


def corpus(held_out: bool) -> list[bytes]:
    """The training files (held_out=False) or the held-out ones, as bytes, in sorted order."""
    _, files = stdlib_files()
    return [f.read_bytes() for i, f in enumerate(files) if (i % HOLDOUT_EVERY == 0) == held_out]


def as_stream(texts: list[bytes]) -> torch.Tensor:
    """One long uint8 stream, files separated by a blank line."""
    return torch.frombuffer(bytearray(b"\n\n".join(texts)), dtype=torch.uint8).long()


def load_model(path: Path = WEIGHTS / "tiny_decoder.pt"):
    """The trained model in fp32 (eval mode) and its config, from the files this script writes."""
    meta = json.loads(path.with_suffix(".json").read_text())
    cfg = ModelConfig(**meta["config"])
    model = build_model(cfg)
    model.load_state_dict({k: v.float() for k, v in torch.load(path, weights_only=True).items()})
    return model.eval(), cfg, meta


def batch_at(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, S + 1)
    chunk = stream[idx]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def eval_loss(model, stream: torch.Tensor, seq_len: int, n_seqs: int) -> float:
    """Mean next-byte cross-entropy (nats/byte) over n_seqs evenly spaced windows of the stream."""
    starts = torch.linspace(0, len(stream) - seq_len - 2, n_seqs).long()
    losses = []
    for s in starts.split(8):
        x, y = batch_at(stream, s, seq_len)
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none"))
    return torch.cat(losses).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS / "tiny_decoder.pt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    root, files = stdlib_files()
    train, held = as_stream(corpus(False)), as_stream(corpus(True))
    print(f"stdlib {root}: {len(files)} files, {len(train):,} training bytes, {len(held):,} held-out bytes")
    model = build_model(CONFIG, seed=args.seed).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{CONFIG!r}: {n_params:,} parameters")

    decay = [p for p in model.parameters() if p.ndim == 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:  # linear warmup, then cosine down to a tenth
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)
    curve, t0 = [], time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,), generator=gen)
        x, y = batch_at(train, starts, args.seq_len)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(round(loss.item(), 4))
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f} nats/byte  lr {lr_at(step):.2e}  "
                  f"{time.perf_counter() - t0:6.1f} s", flush=True)
    train_s = time.perf_counter() - t0

    model.eval()
    held_loss = eval_loss(model, held, args.seq_len, 32)
    print(f"trained {args.steps} steps in {train_s:.0f} s; held-out loss {held_loss:.3f} nats/byte "
          f"({held_loss / math.log(2):.3f} bits/byte) over 32 windows of {args.seq_len} bytes")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, args.out)
    cfg = {k: v for k, v in asdict(CONFIG).items() if k not in ("n_params", "name")}
    meta = {
        "config": cfg, "n_params": n_params,
        "command": "python bench/train_tiny_decoder.py " + " ".join(sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "corpus": {"stdlib": str(root), "python": platform.python_version(), "n_files": len(files),
                   "skipped_dirs": sorted(SKIP_DIRS), "held_out": f"file i of the sorted list when i % {HOLDOUT_EVERY} == 0",
                   "train_bytes": len(train), "held_out_bytes": len(held)},
        "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.1 on matrices), linear warmup 5%, cosine to lr/10, "
                     "grad clip 1.0",
        "threads": 1, "train_seconds": round(train_s, 1), "torch": torch.__version__,
        "held_out_loss_nats_per_byte": round(held_loss, 4), "held_out_eval": f"32 evenly spaced windows of {args.seq_len}",
        "stored_dtype": "float16", "loss_curve": curve,
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) and {args.out.with_suffix('.json').name}")


if __name__ == "__main__":
    main()

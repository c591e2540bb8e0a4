"""`kvkata explore`: one self-contained HTML page to play with the KV cache (no network at all).

Every number the page starts from is computed here, by kvref, when the page is written, and
embedded as one JSON blob: the presets (kvref/config.py), bytes per token (kvref/roofline.py),
the bytes one cached position of a small model takes in a real allocated cache
(kvref/cache.py StaticKVCache), and an example block table from kvref/paging.py's allocator.
The page's own JavaScript redoes only the simple arithmetic live (the formula is shown on the
page): its pure functions (calcView, pagingView) build what the page shows, numbers with their
digits grouped, and refuse an input kvref would refuse (a batch or a prompt of 0) with a visible
message; the rest of the script only puts their output on the page. checks/test_explore.py runs
those functions in node against kvref, and the whole page in a real browser where one is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

DTYPES = {"fp32": 4, "bf16 / fp16": 2, "fp8 / int8": 1, "int4": 0.5}  # bytes per element
BLOCK_SIZE = 16        # vLLM's default block size
NUM_BLOCKS = 64        # the pool of the paging example
PAGING_EXAMPLE = (40, 21, 10)  # prompt of A, prompt of B, decode steps (each: one token to A, then to B)
TOY = dict(vocab_size=256, n_layers=4, d_model=512, n_heads=8, n_kv_heads=2)  # the animated cache: L=4, H=8, Hkv=2, D=64
TOY_MAX_POSITIONS = 32
TOY_PROMPT = 12


def paging_tables(prompt_a: int, prompt_b: int, steps: int, block_size: int = BLOCK_SIZE,
                  num_blocks: int = NUM_BLOCKS) -> dict:
    """kvref's allocator: A and B are allocated their prompts, then each step appends a token to A, then B."""
    from kvref.paging import BlockAllocator
    alloc = BlockAllocator(num_blocks, block_size)
    alloc.allocate("A", range(prompt_a))
    alloc.allocate("B", range(prompt_b))
    for _ in range(steps):
        alloc.append("A")
        alloc.append("B")
    return {s: {"len": alloc.seq_len(s), "table": list(alloc.block_tables[s]), "waste": alloc.waste_slots(s)}
            for s in ("A", "B")}


def page_data() -> dict:
    import torch

    from kvref import roofline
    from kvref.cache import StaticKVCache
    from kvref.config import PRESETS, ModelConfig

    presets = {}
    for name, cfg in PRESETS.items():
        presets[name] = {
            "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "mla_latent_dim": cfg.mla_latent_dim, "mla_rope_dim": cfg.mla_rope_dim,
            "sliding_window": cfg.sliding_window, "max_seq_len": cfg.max_seq_len,
            # kvref's own number at bf16, shown beside the live formula as its anchor
            "kvref_bytes_per_token_bf16": roofline.kv_bytes_per_token(cfg, 2),
        }
    toy = ModelConfig(**TOY, name="toy")
    cache = StaticKVCache(1, toy.n_kv_heads, TOY_MAX_POSITIONS, toy.head_dim, dtype=torch.float16)
    per_position = (cache.k.nbytes + cache.v.nbytes) // TOY_MAX_POSITIONS  # one layer, measured
    return {
        "presets": presets, "dtypes": DTYPES, "block_size": BLOCK_SIZE, "num_blocks": NUM_BLOCKS,
        "toy": {"n_layers": toy.n_layers, "n_heads": toy.n_heads, "n_kv_heads": toy.n_kv_heads,
                "head_dim": toy.head_dim, "max_positions": TOY_MAX_POSITIONS, "prompt": TOY_PROMPT,
                "fp16_bytes_per_position_per_layer": per_position},
        "paging_example": {"prompt_a": PAGING_EXAMPLE[0], "prompt_b": PAGING_EXAMPLE[1], "steps": PAGING_EXAMPLE[2],
                           "tables": paging_tables(*PAGING_EXAMPLE)},
    }


def write_page(path: Path) -> Path:
    data = json.dumps(page_data(), sort_keys=True)
    path.write_text(TEMPLATE.replace("/*DATA*/null", data))
    return path


TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>kvkata explore: the KV cache</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #222; max-width: 1100px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 18px 0 6px; border-bottom: 1px solid #ccc; }
section { margin-bottom: 10px; } label { margin-right: 12px; } input { width: 80px; }
code, .formula { font-family: ui-monospace, monospace; background: #f4f4f4; padding: 1px 4px; }
.formula { display: block; padding: 6px; margin: 6px 0; white-space: pre-wrap; }
.big { font-size: 18px; font-weight: 600; }
.layers { display: flex; flex-wrap: wrap; gap: 10px; margin: 6px 0; }
.layer { border: 1px solid #bbb; padding: 4px; } .layer .t { font-size: 11px; color: #555; }
.row { display: flex; align-items: center; gap: 1px; margin: 1px 0; } .row .h { font-size: 10px; width: 62px; color: #555; white-space: nowrap; }
.cell { width: 9px; height: 12px; background: #eee; }
.cell.prefill { background: #3b7dd8; } .cell.decode { background: #e08a1e; }
.blocks { display: flex; flex-wrap: wrap; gap: 3px; margin: 6px 0; }
.pblock { width: 58px; white-space: nowrap; border: 1px solid #aaa; font-size: 10px; text-align: center; }
.pblock .fill { height: 8px; background: #eee; position: relative; } .pblock .fill div { height: 8px; }
.A .fill div { background: #3b7dd8; } .B .fill div { background: #2a9d5c; }
table.bt { border-collapse: collapse; margin: 4px 0; } table.bt td, table.bt th { border: 1px solid #ccc; padding: 1px 5px; font-size: 12px; }
.legend span { display: inline-block; width: 10px; height: 10px; margin: 0 3px 0 10px; }
.note { color: #555; font-size: 12px; }
.error { color: #b00020; font-weight: 600; margin: 4px 0; }
.pblock.over { border: 1px dashed #b00020; color: #b00020; }
</style></head>
<body>
<h1>kvkata explore: the KV cache</h1>
<div class="note">Written by <code>kvkata explore</code>; its numbers come from kvref when the page was written. No network is used.</div>

<h2>1. Memory calculator</h2>
<section>
<label>preset <select id="preset"></select></label>
<label>dtype <select id="dtype"></select></label>
<label>batch <input id="batch" type="number" min="1" step="1" value="1"></label>
<label>context <input id="context" type="number" min="1" step="1" value="8192"></label>
<div class="error" id="calc-error" role="alert" hidden></div>
<span class="formula" id="formula"></span>
<div>KV bytes per token: <span class="big" id="per-token"></span> B (<span id="per-token-human"></span>)</div>
<div>KV cache, batch × context: <span class="big" id="total"></span> B = <span class="big" id="total-human"></span></div>
<div class="note" id="calc-note"></div>
</section>

<h2>2. The cache filling: prefill, then decode</h2>
<section>
<div class="note" id="toy-desc"></div>
<button id="prefill">prefill the prompt</button> <button id="decode">decode one token</button> <button id="play">play</button> <button id="reset">reset</button>
<span class="legend"><span style="background:#3b7dd8"></span>prefill <span style="background:#e08a1e"></span>decode</span>
<div>cached positions T = <span class="big" id="cached-positions">0</span>,
  cached K rows = L·Hkv·T = <span class="big" id="cached-rows">0</span> (and as many V rows),
  cache bytes (fp16) = <span class="big" id="cache-bytes">0</span> B</div>
<div class="layers" id="grid"></div>
</section>

<h2>3. Paging: block tables (block_size <span id="bs"></span>)</h2>
<section>
<label>prompt A <input id="prompt-a" type="number" min="1" step="1"></label>
<label>prompt B <input id="prompt-b" type="number" min="1" step="1"></label>
<label>decode steps <input id="steps" type="number" min="0" step="1"></label>
<div class="error" id="paging-error" role="alert" hidden></div>
<span class="formula">allocate(A, prompt A); allocate(B, prompt B); each step: append(A), append(B)
a new physical block is taken (lowest free first) when a sequence's last block is full
slot of position p = block_table[p // bs] · bs + p % bs;   waste = blocks · bs − length</span>
<table class="bt" id="bt"></table>
<div class="blocks" id="pool"></div>
<div class="note" id="paging-note"></div>
<div class="note">card03 (slot reservation and fragmentation) and card13 (sharing) ask for these numbers; kvref/paging.py is the allocator.</div>
</section>

<script>
"use strict";
const DATA = /*DATA*/null;

// ---- numbers as a reader reads them ------------------------------------------------------
function grouped(n) {  // 42949672960 -> "42,949,672,960" (the fraction, if any, kept as is)
  const [whole, frac] = String(n).split(".");
  return whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",") + (frac ? "." + frac : "");
}
function human(n) {  // binary units, 3 significant digits: "40 GiB", "128 KiB", "1.5 MiB"
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${Number(n.toPrecision(3))} ${units[i]}`;
}
function readCount(text, name, least, what) {  // {value} or {error}: a whole number >= least, never a silent default
  text = String(text);
  const v = Number(text);
  if (text.trim() === "" || !Number.isInteger(v) || v < least)
    return { error: `${name} must be a whole number ≥ ${least}${what ? " (" + what + ")" : ""}: got ${text.trim() === "" ? "nothing" : text}` };
  return { value: v };
}

// ---- 1. memory calculator --------------------------------------------------------------
function kvBytesPerToken(p, dtypeBytes) {
  if (p.mla_latent_dim > 0) return p.n_layers * (p.mla_latent_dim + p.mla_rope_dim) * dtypeBytes;  // MLA: latent + RoPE key
  return 2 * p.n_layers * p.n_kv_heads * p.head_dim * dtypeBytes;  // K and V, every layer, every KV head
}
function calcView(name, dtypeName, batchText, contextText) {
  const p = DATA.presets[name], b = DATA.dtypes[dtypeName];
  const batch = readCount(batchText, "batch", 1, "sequences"), ctx = readCount(contextText, "context", 1, "tokens");
  const perToken = kvBytesPerToken(p, b);
  const view = {
    formula: p.mla_latent_dim > 0
      ? `bytes/token = L · (latent + rope) · bytes = ${p.n_layers} · (${p.mla_latent_dim} + ${p.mla_rope_dim}) · ${b}`
      : `bytes/token = 2 (K and V) · L · Hkv · D · bytes = 2 · ${p.n_layers} · ${p.n_kv_heads} · ${p.head_dim} · ${b}`,
    perToken: grouped(perToken), perTokenHuman: human(perToken),
    error: [batch.error, ctx.error].filter(Boolean).join("; "),
  };
  if (view.error) { view.total = view.totalHuman = "—"; view.note = ""; return view; }
  const total = batch.value * ctx.value * perToken;
  view.total = grouped(total); view.totalHuman = human(total);
  view.note = `${name}: H=${p.n_heads} query heads, Hkv=${p.n_kv_heads} KV heads; kvref at bf16: ${grouped(p.kvref_bytes_per_token_bf16)} B/token.`;
  if (p.sliding_window) view.note += ` Sliding window W=${grouped(p.sliding_window)}: a rolling buffer would keep only W positions; this counts all (as kvref.roofline.memory_needed).`;
  if (ctx.value > p.max_seq_len) view.note += ` Context is past the model's ${grouped(p.max_seq_len)} positions.`;
  return view;
}

// ---- 3. paging: the allocator's rule, replayed -------------------------------------------
function pagingTables(promptA, promptB, steps, bs) {
  let nextFree = 0;  // a fresh pool, nothing freed: the free list hands out 0, 1, 2, ...
  const seqs = { A: { len: 0, table: [] }, B: { len: 0, table: [] } };
  const add = (s) => { if (s.len % bs === 0) s.table.push(nextFree++); s.len += 1; };
  for (let i = 0; i < promptA; i++) add(seqs.A);
  for (let i = 0; i < promptB; i++) add(seqs.B);
  for (let i = 0; i < steps; i++) { add(seqs.A); add(seqs.B); }
  for (const s of Object.values(seqs)) s.waste = s.table.length * bs - s.len;
  return seqs;
}
function pagingView(aText, bText, stepsText) {
  const bs = DATA.block_size, n = DATA.num_blocks;
  const why = "kvref's allocate: a sequence starts with at least one token";
  const a = readCount(aText, "prompt A", 1, why), b = readCount(bText, "prompt B", 1, why);
  const steps = readCount(stepsText, "decode steps", 0, "");
  const error = [a.error, b.error, steps.error].filter(Boolean).join("; ");
  if (error) return { error, rows: "", pool: "", note: "" };
  const seqs = pagingTables(a.value, b.value, steps.value, bs);
  const used = seqs.A.table.length + seqs.B.table.length;
  let rows = "<tr><th>sequence</th><th>length</th><th>block table (logical → physical)</th><th>waste slots</th></tr>";
  for (const [name, s] of Object.entries(seqs))
    rows += `<tr id="bt-${name}"><td>${name}</td><td class="len">${s.len}</td><td class="table">${s.table.join(", ")}</td><td class="waste">${s.waste}</td></tr>`;
  const owner = {};
  for (const [name, s] of Object.entries(seqs)) s.table.forEach((blk, i) => {
    owner[blk] = { name, fill: Math.min(bs, s.len - i * bs), logical: i };
  });
  // Every block counted is drawn: the whole pool, used or free, then any block it lacks.
  let pool = "";
  for (let blk = 0; blk < Math.max(n, used); blk++) {
    const o = owner[blk];
    const over = blk >= n ? " over" : "", label = blk >= n ? "no block" : `#${blk}`;
    pool += o ? `<div class="pblock ${o.name}${over}">${label} ${o.name}[${o.logical}]<div class="fill"><div style="width:${100 * o.fill / bs}%"></div></div>${o.fill}/${bs}</div>`
              : `<div class="pblock">#${blk} free<div class="fill"></div>0/${bs}</div>`;
  }
  const note = used > n ? `needs ${grouped(used)} blocks: more than the pool's ${n} (kvref raises OutOfBlocks); the ${used - n} it lacks are drawn dashed`
    : `${used} of ${n} physical blocks used, ${n - used} free; the waste is under one block per sequence.`;
  return { error: "", rows, pool, note, used };
}

// ---- the page ------------------------------------------------------------------------------
if (typeof document !== "undefined") {
const $ = (id) => document.getElementById(id);
function showError(id, text) { $(id).textContent = text; $(id).hidden = !text; }
function updateCalc() {
  const name = $("preset").value;
  const v = calcView(name, $("dtype").value, $("batch").value, $("context").value);
  showError("calc-error", v.error);
  $("formula").textContent = v.formula;
  $("per-token").textContent = v.perToken; $("per-token-human").textContent = v.perTokenHuman;
  $("total").textContent = v.total; $("total-human").textContent = v.totalHuman;
  $("calc-note").textContent = v.note;
}

// ---- 2. the cache filling ----------------------------------------------------------------
const toy = DATA.toy;
let cached = 0, prefilled = false;
function buildGrid() {
  const grid = $("grid");
  for (let l = 0; l < toy.n_layers; l++) {
    const layer = document.createElement("div"); layer.className = "layer";
    layer.innerHTML = `<div class="t">layer ${l}</div>`;
    for (let h = 0; h < toy.n_kv_heads; h++) {
      const row = document.createElement("div"); row.className = "row";
      row.innerHTML = `<span class="h">KV head ${h}</span>`;
      for (let t = 0; t < toy.max_positions; t++) {
        const c = document.createElement("div"); c.className = "cell"; c.dataset.t = t; row.appendChild(c);
      }
      layer.appendChild(row);
    }
    grid.appendChild(layer);
  }
}
function paintGrid() {
  for (const c of document.querySelectorAll("#grid .cell")) {
    const t = +c.dataset.t;
    c.className = "cell" + (t < cached ? (t < toy.prompt ? " prefill" : " decode") : "");
  }
  $("cached-positions").textContent = grouped(cached);
  $("cached-rows").textContent = grouped(toy.n_layers * toy.n_kv_heads * cached);
  $("cache-bytes").textContent = grouped(toy.n_layers * toy.fp16_bytes_per_position_per_layer * cached);
  $("decode").disabled = !prefilled || cached >= toy.max_positions;
  $("prefill").disabled = prefilled;
}

function updatePaging() {
  const v = pagingView($("prompt-a").value, $("prompt-b").value, $("steps").value);
  showError("paging-error", v.error);
  $("bt").innerHTML = v.rows; $("pool").innerHTML = v.pool; $("paging-note").textContent = v.note;
}

// ---- wiring ------------------------------------------------------------------------------
for (const name of Object.keys(DATA.presets)) $("preset").add(new Option(name, name));
for (const name of Object.keys(DATA.dtypes)) $("dtype").add(new Option(`${name} (${DATA.dtypes[name]} B)`, name));
$("preset").value = "llama-3-8b"; $("dtype").value = "bf16 / fp16";
for (const id of ["preset", "dtype", "batch", "context"]) $(id).addEventListener("input", updateCalc);
$("toy-desc").textContent = `A small model (L=${toy.n_layers} layers, H=${toy.n_heads} query heads sharing Hkv=${toy.n_kv_heads} KV heads, D=${toy.head_dim}). ` +
  `Prefill writes all ${toy.prompt} prompt positions at once; each decode step adds one column in every layer and KV head. ` +
  `Bytes per position per layer were measured on kvref's StaticKVCache: ${grouped(toy.fp16_bytes_per_position_per_layer)} B.`;
$("prefill").addEventListener("click", () => { cached = toy.prompt; prefilled = true; paintGrid(); });
$("decode").addEventListener("click", () => { if (cached < toy.max_positions) cached += 1; paintGrid(); });
let timer = null;
function stop() { clearInterval(timer); timer = null; $("play").textContent = "play"; }
$("play").addEventListener("click", () => {
  if (timer) return stop();
  if (!prefilled || cached >= toy.max_positions) { cached = toy.prompt; prefilled = true; paintGrid(); }
  $("play").textContent = "pause";
  timer = setInterval(() => { cached += 1; paintGrid(); if (cached >= toy.max_positions) stop(); }, 150);
});
$("reset").addEventListener("click", () => { stop(); cached = 0; prefilled = false; paintGrid(); });
$("bs").textContent = DATA.block_size;
$("prompt-a").value = DATA.paging_example.prompt_a; $("prompt-b").value = DATA.paging_example.prompt_b;
$("steps").value = DATA.paging_example.steps;
for (const id of ["prompt-a", "prompt-b", "steps"]) $(id).addEventListener("input", updatePaging);
buildGrid(); paintGrid(); updateCalc(); updatePaging();
}
</script>
</body></html>
"""

"""`kvkata explore`: its JavaScript in node, and the whole page in a real headless browser.

Two drivers. node (where `node` is on PATH) runs the page's own script, as written by the
command, and calls its pure functions: the calculator's view (grouped digits, a human unit, a
refused batch of 0), the paging view (block tables against kvref's allocator, the pool drawn
block for block as counted). These checks need no browser.

The browser checks drive Debian's chromium with playwright's Python package: the page is
written by the command into tmp_path and opened via file://. Every request that is not a file://
URL is aborted and counted: the page must use no network. The numbers it shows after each input
change are compared with kvref's (kv_bytes_per_token, the allocator's block tables). They skip
with the reason where playwright or /usr/bin/chromium is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from kvkata import ROOT, explore
from kvref import roofline
from kvref.cache import GrowingKVCache
from kvref.config import ModelConfig, preset
from kvref.paging import BlockAllocator

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NODE = shutil.which("node")

pytestmark = pytest.mark.timeout(120)  # one browser start for the browser tests


# --- the page's script in node -----------------------------------------------------------------

@pytest.fixture(scope="module")
def page_js(tmp_path_factory):
    """Evaluate JavaScript expressions after the page's own script (no DOM: the page's wiring is skipped)."""
    if NODE is None:
        pytest.skip("node is not installed: the explorer's script checks need it")
    html = explore.write_page(tmp_path_factory.mktemp("explore-js") / "page.html").read_text()
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)

    def run(expr: str):
        proc = subprocess.run([NODE], input=f"{script}\nprocess.stdout.write(JSON.stringify({expr}));",
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    return run


def kvref_tables(prompt_a: int, prompt_b: int, steps: int) -> tuple[dict, int]:
    """kvref's allocator on the page's pool, the same steps; ({seq: block table}, blocks used), or None if it runs out."""
    alloc = BlockAllocator(explore.NUM_BLOCKS, explore.BLOCK_SIZE)
    alloc.allocate("A", range(prompt_a))
    alloc.allocate("B", range(prompt_b))
    for _ in range(steps):
        alloc.append("A")
        alloc.append("B")
    return {s: alloc.block_tables[s] for s in "AB"}, explore.NUM_BLOCKS - alloc.num_free_blocks


def test_the_calculator_groups_digits_and_gives_a_human_unit(page_js):
    """llama-3-8b, bf16, 40 sequences of 8,192 tokens: 42,949,672,960 B, which is 40 GiB."""
    v = page_js('calcView("llama-3-8b", "bf16 / fp16", "40", "8192")')
    per_token = int(roofline.kv_bytes_per_token(preset("llama-3-8b"), 2))
    assert v["perToken"] == f"{per_token:,}" == "131,072" and v["perTokenHuman"] == "128 KiB", v
    assert v["total"] == f"{40 * 8192 * per_token:,}" == "42,949,672,960" and v["totalHuman"] == "40 GiB", v
    assert "131,072 B/token" in v["note"] and v["error"] == ""


@pytest.mark.parametrize("batch, context, says", [
    ("0", "8192", "batch must be a whole number ≥ 1 (sequences): got 0"),
    ("-3", "8192", "batch must be a whole number ≥ 1 (sequences): got -3"),
    ("2.5", "8192", "batch must be a whole number ≥ 1 (sequences): got 2.5"),
    ("", "8192", "batch must be a whole number ≥ 1 (sequences): got nothing"),
    ("1", "0", "context must be a whole number ≥ 1 (tokens): got 0"),
])
def test_the_calculator_refuses_a_batch_or_context_below_1_and_says_so(page_js, batch, context, says):
    v = page_js(f'calcView("llama-3-8b", "bf16 / fp16", {json.dumps(batch)}, {json.dumps(context)})')
    assert v["error"] == says and v["total"] == "—" and v["totalHuman"] == "—", v


@pytest.mark.parametrize("prompt_a, prompt_b, steps", [(224, 224, 0), (40, 21, 10), (200, 230, 40), (1, 1, 0)])
def test_the_pool_draws_every_block_it_counts_and_the_tables_are_kvrefs(page_js, prompt_a, prompt_b, steps):
    v = page_js(f'pagingView("{prompt_a}", "{prompt_b}", "{steps}")')
    tables, used = kvref_tables(prompt_a, prompt_b, steps)
    drawn = re.findall(r'<div class="pblock( [AB])?">#(\d+)', v["pool"])
    assert [int(n) for _, n in drawn] == list(range(explore.NUM_BLOCKS)), "the pool is drawn whole, block 0 to 63"
    assert sum(bool(owner) for owner, _ in drawn) == used == v["used"]
    assert v["note"].startswith(f"{used} of {explore.NUM_BLOCKS} physical blocks used, {explore.NUM_BLOCKS - used} free")
    for s in "AB":
        row = re.search(rf'<tr id="bt-{s}">.*?<td class="table">([^<]*)</td>', v["rows"]).group(1)
        assert [int(b) for b in row.split(", ")] == tables[s], (s, row)


def test_a_pool_too_small_draws_the_blocks_it_lacks_and_says_kvref_would_refuse(page_js):
    v = page_js('pagingView("600", "600", "0")')  # 38 blocks each: 76 of a pool of 64
    with pytest.raises(MemoryError):
        kvref_tables(600, 600, 0)
    assert v["pool"].count('class="pblock') == 76 and v["pool"].count(" over\"") == 12, v["pool"][:300]
    assert v["note"].startswith("needs 76 blocks: more than the pool's 64 (kvref raises OutOfBlocks)"), v["note"]


def test_a_prompt_of_0_is_refused_as_kvrefs_allocator_refuses_it(page_js):
    with pytest.raises(ValueError, match="at least one token"):
        BlockAllocator(4, 16).allocate("A", range(0))
    v = page_js('pagingView("0", "21", "10")')
    assert v["error"].startswith("prompt A must be a whole number ≥ 1") and "at least one token" in v["error"], v
    assert v["pool"] == "" and v["rows"] == ""


# --- the page in a browser ---------------------------------------------------------------------

def playwright_or_skip():
    """playwright's sync API, or a skip saying what is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); the explorer's browser tests need it")
    return sync_api


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    sync_api = playwright_or_skip()
    out = tmp_path_factory.mktemp("explore")
    env = {k: v for k, v in os.environ.items() if k not in ("KVKATA_MODE", "PYTEST_ADDOPTS")}
    proc = subprocess.run([sys.executable, "-m", "kvkata.cli", "explore"], cwd=out, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    html = out / "kvkata-explore.html"
    assert html.exists(), proc.stdout
    blocked = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        ctx = browser.new_context(viewport={"width": 1150, "height": 1000})

        def route(r):
            if r.request.url.startswith("file://"):
                r.continue_()
            else:
                blocked.append(r.request.url)
                r.abort()
        ctx.route("**/*", route)
        pg = ctx.new_page()
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(html.as_uri())
        pg.wait_for_selector("#per-token:not(:empty)")
        pg.expect = sync_api.expect
        pg.blocked, pg.errors, pg.out = blocked, errors, out
        yield pg
        browser.close()


def number(pg, selector: str) -> float:
    """A number the page shows with its digits grouped: "42,949,672,960"."""
    return float(pg.text_content(selector).replace(",", ""))


def set_calc(pg, name: str, dtype: str, batch: int, context: int) -> tuple[float, float]:
    pg.select_option("#preset", name)
    pg.select_option("#dtype", dtype)
    pg.fill("#batch", str(batch))
    pg.fill("#context", str(context))
    return number(pg, "#per-token"), number(pg, "#total")


@pytest.mark.parametrize("name, dtype, bytes_, batch, context", [
    ("llama-3-8b", "bf16 / fp16", 2, 1, 8192),       # GQA: 8 KV heads for 32 query heads
    ("llama-3-70b", "fp8 / int8", 1, 16, 8192),
    ("llama-2-7b", "fp32", 4, 4, 4096),              # MHA
    ("llama-3.1-70b", "int4", 0.5, 3, 131072),
    ("deepseek-v3", "bf16 / fp16", 2, 2, 32768),     # MLA: a latent and a RoPE key, not per-head K and V
])
def test_the_memory_calculator_shows_kvrefs_bytes(page, name, dtype, bytes_, batch, context):
    per_token, total = set_calc(page, name, dtype, batch, context)
    want = roofline.kv_bytes_per_token(preset(name), bytes_)
    assert per_token == want, f"{name} at {bytes_} B: the page shows {per_token} B/token, kvref {want}"
    assert total == batch * context * want, f"{name}: the page shows {total} B for {batch}×{context}"


def test_the_cache_grows_by_the_prompt_at_prefill_and_one_position_per_decode_step(page):
    """Side by side: the page's buttons, and kvref's GrowingKVCache (one per layer, fp16) fed the same steps."""
    toy = ModelConfig(**explore.TOY)
    L, Hkv, D, prompt = toy.n_layers, toy.n_kv_heads, toy.head_dim, explore.TOY_PROMPT
    caches = [GrowingKVCache() for _ in range(L)]

    def feed(first: int, n: int) -> None:
        for cache in caches:
            kv = torch.zeros(1, Hkv, n, D, dtype=torch.float16)  # (B, Hkv, S, D)
            cache.update(torch.arange(first, first + n), kv, kv)

    page.click("#reset")
    assert page.text_content("#cached-positions") == "0"
    page.click("#prefill")
    feed(0, prompt)
    for step in range(4):
        if step:
            page.click("#decode")
            feed(caches[0].seq_len, 1)
        t = caches[0].seq_len
        assert number(page, "#cached-positions") == t, f"after prefill and {step} decode steps"
        assert number(page, "#cached-rows") == sum(c.k.shape[0] * c.k.shape[1] * c.k.shape[2] for c in caches)
        assert number(page, "#cache-bytes") == sum(c.k.nbytes + c.v.nbytes for c in caches)
        assert page.locator("#grid .cell.prefill").count() == L * Hkv * prompt
        assert page.locator("#grid .cell.decode").count() == L * Hkv * step


def test_play_fills_the_cache_to_its_last_position_and_stops(page):
    page.click("#reset")
    page.click("#prefill")
    for _ in range(explore.TOY_MAX_POSITIONS - explore.TOY_PROMPT - 3):  # play the last 3 steps only
        page.click("#decode")
    page.click("#play")
    last = str(explore.TOY_MAX_POSITIONS)
    page.expect(page.locator("#cached-positions")).to_have_text(last, timeout=15_000)
    page.wait_for_timeout(400)  # a timer still running would step past the end
    assert page.text_content("#cached-positions") == last and page.text_content("#play") == "play"
    assert page.locator("#grid .cell:not(.prefill):not(.decode)").count() == 0


@pytest.mark.parametrize("prompt_a, prompt_b, steps", [(40, 21, 10), (16, 1, 0), (17, 33, 15), (5, 5, 40)])
def test_the_block_tables_are_kvrefs_allocators(page, prompt_a, prompt_b, steps):
    page.fill("#prompt-a", str(prompt_a))
    page.fill("#prompt-b", str(prompt_b))
    page.fill("#steps", str(steps))
    alloc = BlockAllocator(64, 16)
    alloc.allocate("A", range(prompt_a))
    alloc.allocate("B", range(prompt_b))
    for _ in range(steps):
        alloc.append("A")
        alloc.append("B")
    for s in ("A", "B"):
        shown = page.text_content(f"#bt-{s} .table")
        assert [int(b) for b in shown.split(", ")] == alloc.block_tables[s], f"sequence {s}: block table {shown}"
        assert int(page.text_content(f"#bt-{s} .len")) == alloc.seq_len(s)
        assert int(page.text_content(f"#bt-{s} .waste")) == alloc.waste_slots(s)


def test_the_page_shows_grouped_digits_and_a_human_unit(page):
    set_calc(page, "llama-3-8b", "bf16 / fp16", 40, 8192)
    assert page.text_content("#total") == "42,949,672,960" and page.text_content("#total-human") == "40 GiB"
    assert not page.is_visible("#calc-error")


def test_a_batch_of_0_shows_a_message_on_the_page_and_no_total(page):
    page.select_option("#preset", "llama-3-8b")
    page.select_option("#dtype", "bf16 / fp16")
    page.fill("#batch", "0")
    page.fill("#context", "8192")  # no number to read back: the total is refused, not computed
    assert page.is_visible("#calc-error"), "a batch of 0 must be refused where the learner looks"
    assert "batch must be a whole number ≥ 1" in page.text_content("#calc-error")
    assert page.text_content("#total") == "—"
    set_calc(page, "llama-3-8b", "bf16 / fp16", 1, 8192)
    assert not page.is_visible("#calc-error")


def test_the_pool_on_the_page_holds_every_block_of_the_note(page):
    page.fill("#prompt-a", "224"); page.fill("#prompt-b", "224"); page.fill("#steps", "0")
    assert page.text_content("#paging-note").startswith(f"28 of {explore.NUM_BLOCKS} physical blocks used")
    assert page.locator("#pool .pblock").count() == explore.NUM_BLOCKS
    assert page.locator("#pool .pblock.A").count() + page.locator("#pool .pblock.B").count() == 28


def test_the_page_made_no_network_request_and_no_script_error(page):
    assert page.blocked == [], f"the page asked the network for {page.blocked}"
    assert page.errors == []


def test_a_screenshot_of_the_page(page):
    set_calc(page, "llama-3-70b", "bf16 / fp16", 8, 8192)
    page.fill("#prompt-a", "40"); page.fill("#prompt-b", "21"); page.fill("#steps", "10")
    page.click("#reset"); page.click("#prefill")
    for _ in range(5):
        page.click("#decode")
    shot = page.out / "explore.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("KVKATA_EXPLORE_SHOT"):  # maintainers: refresh docs/explore.png
        Path(os.environ["KVKATA_EXPLORE_SHOT"]).write_bytes(shot.read_bytes())

"""`kvkata explore` in a real headless browser: Debian's chromium driven by playwright's Python package.

The page is written by the command into tmp_path and opened via file://. Every request that is
not a file:// URL is aborted and counted: the page must use no network. The numbers it shows
after each input change are compared with kvref's (kv_bytes_per_token, the allocator's block
tables). Skips with the reason where playwright or /usr/bin/chromium is missing.
"""

from __future__ import annotations

import os
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

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); the explorer's browser test needs it",
                allow_module_level=True)

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # one browser start for the whole module


@pytest.fixture(scope="module")
def page(tmp_path_factory):
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
        pg.blocked, pg.errors, pg.out = blocked, errors, out
        yield pg
        browser.close()


def set_calc(pg, name: str, dtype: str, batch: int, context: int) -> tuple[float, float]:
    pg.select_option("#preset", name)
    pg.select_option("#dtype", dtype)
    pg.fill("#batch", str(batch))
    pg.fill("#context", str(context))
    return float(pg.text_content("#per-token")), float(pg.text_content("#total"))


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
        assert int(page.text_content("#cached-positions")) == t, f"after prefill and {step} decode steps"
        assert int(page.text_content("#cached-rows")) == sum(c.k.shape[0] * c.k.shape[1] * c.k.shape[2] for c in caches)
        assert int(page.text_content("#cache-bytes")) == sum(c.k.nbytes + c.v.nbytes for c in caches)
        assert page.locator("#grid .cell.prefill").count() == L * Hkv * prompt
        assert page.locator("#grid .cell.decode").count() == L * Hkv * step


def test_play_fills_the_cache_to_its_last_position_and_stops(page):
    page.click("#reset")
    page.click("#prefill")
    for _ in range(explore.TOY_MAX_POSITIONS - explore.TOY_PROMPT - 3):  # play the last 3 steps only
        page.click("#decode")
    page.click("#play")
    last = str(explore.TOY_MAX_POSITIONS)
    sync_api.expect(page.locator("#cached-positions")).to_have_text(last, timeout=15_000)
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

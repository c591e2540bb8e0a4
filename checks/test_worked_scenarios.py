"""Every worked scenario fits its devices, as the text that works it says.

card11's red flag reads "gives a crossover batch without checking that weights plus that many
caches fit in memory", and the project once worked a batch of 64 Llama-2-70B sequences of 4,095
tokens on two H100s (224 GB against 171 GB). So every worked number that puts a real model on a
real device (a card's notes, its hints, its tests) is listed, machine-readable, in that card's
notes.toml as a `[[scenarios]]` entry:

    [[scenarios]]
    model = "llama-2-70b"   # a kvref preset
    n_layers = 160          # optional: the preset with this many layers (card05's deeper model)
    device = "H100-SXM"     # a kvref.hardware name
    count = 2               # tensor parallel over this many devices (default 1)
    batch = 24              # sequences
    context = 4096          # positions each sequence's cache holds
    dtype = "bfloat16"      # weights and cache
    fits = true             # what the text says (false: the text says it does not fit)
    largest = true          # optional: the text says no larger batch fits
    cache_gib = 48          # optional, instead of batch and context: the cache budget the text reserves
                            # (cache_gb: the same in 10^9 bytes)
    quotes = ["..."]        # where the card's notes or hints state it (exact substrings)
    tests = ["test_..."]    # the card's tests that use it

and text that names a real model and a device without a capacity claim (a per-device ratio, a
device that is a bandwidth only) is listed as `[[not_scenarios]]` with a quote and the reason.

The checks: each scenario fits (or not) as it says, computed per device with kvref (every
parameter in `dtype` split over the devices; the cache of the KV heads one rank holds, replicated
when there are more devices than KV heads; tensor parallelism must split the heads evenly); each
quote is in the card's text and each cited test uses the model, the device and the numbers; and
every notes or hints entry that names a real model next to a device, and every kata test that puts
a named preset on a named device, cites a scenario (or says why it has none).
"""

from __future__ import annotations

import ast
import re

import pytest
import torch

from checks.conftest import ROOT
from kvkata import manifest
from kvref.config import ModelConfig, preset
from kvref.hardware import hardware
from kvref.tensor_parallel import tp_cache_nbytes_meta
from kvref.roofline import kv_bytes_per_token, n_params

CARDS = manifest.cards()
GIB = 2**30
FIELDS = {"model", "n_layers", "device", "count", "batch", "context", "dtype", "fits", "largest", "cache_gib", "cache_gb",
          "quotes", "tests"}
# Text that names a real model beside a device, in any card's notes or hints.
MODEL_WORDS = re.compile(r"Llama|Mistral|Mixtral|GPT-3|DeepSeek")
DEVICE_WORDS = re.compile(r"H100|H200|A100")
# How the tests spell each device: kvref.hardware's constants.
DEVICE_CONSTANTS = {"H100_SXM": "H100-SXM", "H200": "H200", "A100_40GB": "A100-40GB", "A100_80GB_SXM": "A100-80GB-SXM"}


def scenarios():
    return [(card, i, s) for card in CARDS for i, s in enumerate(card.notes().get("scenarios", []))]


def not_scenarios():
    return [(card, n) for card in CARDS for n in card.notes().get("not_scenarios", [])]


def scenario_id(item) -> str:
    card, i, s = item
    return f"{card.id}-{i}-{s['model']}-{s.get('count', 1)}x{s['device']}"


def text_entries(card: manifest.Card):
    """(where, text) for every entry of a card's notes and hints: a question, a paragraph of the
    derivation, a follow-up with its answer, a red flag, a hint level."""
    notes = card.notes()
    yield from ((f"questions[{i}]", q) for i, q in enumerate(notes["questions"]))
    yield from ((f"derivation paragraph {i}", p) for i, p in enumerate(notes["derivation"].split("\n\n")))
    yield from ((f"follow_ups[{i}]", f["question"] + " " + f["expect"]) for i, f in enumerate(notes["follow_ups"]))
    yield from ((f"red_flags[{i}]", r) for i, r in enumerate(notes["red_flags"]))
    for kata, levels in card.hints().items():
        yield from ((f"hints {kata} level {i + 1}", h) for i, h in enumerate(levels))


def card_text(card: manifest.Card) -> str:
    return "\n".join(t for _, t in text_entries(card))


def kata_test_functions(card: manifest.Card) -> dict[str, ast.FunctionDef]:
    """Every test function in the card's test files, by name (decorators included in its node)."""
    out = {}
    for path in sorted((ROOT / "katas" / card.dir).glob("test_*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])  # @example(...) included
                out[node.name] = (node, "\n".join(lines[first - 1:node.end_lineno]), source)
    return out


def per_device_need(cfg: ModelConfig, n: int, batch: int, context: int, dtype: torch.dtype,
                    cache_bytes: int | None = None) -> int:
    """Bytes one of n tensor-parallel devices holds: its share of every parameter and its ranks' cache.

    kvref.tensor_parallel.tp_cache_nbytes_meta refuses a device count that does not split the query heads
    evenly, or that neither divides nor is a multiple of the KV heads; past Hkv devices each KV head
    is replicated. An MLA latent is shared by all heads: every device holds all of it.
    """
    weights = n_params(cfg) * dtype.itemsize / n
    if cache_bytes is not None:
        return weights + cache_bytes / n
    if cfg.is_mla:
        return weights + batch * context * kv_bytes_per_token(cfg, dtype.itemsize)
    return weights + tp_cache_nbytes_meta(cfg, n, 0, batch, context, dtype)


def budget(s: dict) -> int | None:
    """The cache budget a scenario reserves, in bytes, if it gives one instead of a batch."""
    if "cache_gib" in s:
        return int(s["cache_gib"] * GIB)
    return int(s["cache_gb"] * 1e9) if "cache_gb" in s else None


def fits(s: dict, batch: int | None = None) -> tuple[bool, str]:
    cfg, hw, n, dtype = preset(s["model"]), hardware(s["device"]), s.get("count", 1), getattr(torch, s["dtype"])
    if "n_layers" in s:
        cfg = cfg.with_(n_layers=s["n_layers"])
    cache = budget(s)
    batch = s.get("batch") if batch is None else batch
    need = per_device_need(cfg, n, batch, s.get("context"), dtype, cache)
    what = f"{cache:,} B of cache" if cache is not None else f"batch {batch} x {s['context']:,} positions"
    return need <= hw.memory_bytes, (f"{s['model']} ({cfg.n_layers} layers) in {s['dtype']}, {what}, on {n} x {hw.name}: "
                                     f"{need / 1e9:.4g} GB per device against {hw.memory_bytes / 1e9:.4g} GB")


# --- the scenarios are well-formed and true -------------------------------------------------------

def test_the_cards_list_worked_scenarios():
    assert len(scenarios()) >= 10


@pytest.mark.parametrize("item", scenarios(), ids=scenario_id)
def test_a_scenario_names_a_preset_a_device_and_either_a_batch_or_a_cache_budget(item):
    card, _, s = item
    assert set(s) <= FIELDS, f"{card.id}: unknown scenario fields {set(s) - FIELDS}"
    preset(s["model"]), hardware(s["device"])
    assert isinstance(getattr(torch, s["dtype"], None), torch.dtype), s["dtype"]
    assert (budget(s) is not None) != ("batch" in s and "context" in s), "a batch and a context, or a cache budget"
    assert s.get("quotes") or s.get("tests"), "a scenario says where it is worked: quotes, tests or both"


@pytest.mark.parametrize("item", scenarios(), ids=scenario_id)
def test_a_worked_scenario_fits_its_devices_as_its_text_says(item):
    card, _, s = item
    try:
        ok, why = fits(s)
    except ValueError as e:  # tensor parallelism cannot split the heads over this many devices
        ok, why = False, f"{s['count']} x {s['device']}: {e}"
        assert not s.get("fits", True), f"{card.id}: {why}"
        return
    assert ok == s.get("fits", True), f"{card.id} says it {'fits' if s.get('fits', True) else 'does not fit'}: {why}"
    if s.get("largest"):
        more, why = fits(s, s["batch"] + 1)
        assert not more, f"{card.id} says batch {s['batch']} is the most that fits, but one more does: {why}"


@pytest.mark.parametrize("item", scenarios(), ids=scenario_id)
def test_a_scenario_is_quoted_in_its_card_and_used_by_the_tests_it_names(item):
    card, _, s = item
    text = card_text(card)
    for quote in s.get("quotes", []):
        assert quote in text, f"{card.id}'s notes and hints no longer say {quote!r}: update the scenario"
    functions = kata_test_functions(card)
    constant = next(c for c, name in DEVICE_CONSTANTS.items() if name == s["device"])
    for name in s.get("tests", []):
        assert name in functions, f"{card.id} has no test {name}"
        node, source, _ = functions[name]
        ints = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and type(c.value) is int}
        assert f'"{s["model"]}"' in source, f"{name} does not use {s['model']}"
        assert constant in source or f'"{s["device"]}"' in source, f"{name} does not use {constant}"
        if "context" in s:
            assert ints & {s["context"], s["context"] - 1}, f"{name} has no context of {s['context']} positions"
        if s.get("batch", 1) > 1:
            assert s["batch"] in ints, f"{name} has no batch of {s['batch']}"
        for unit in ("cache_gib", "cache_gb"):
            if unit in s:
                assert s[unit] in ints, f"{name} has no cache budget of {s[unit]} ({unit})"


# --- nothing worked is missing from the lists ------------------------------------------------------

@pytest.mark.parametrize("card", CARDS, ids=[c.id for c in CARDS])
def test_every_entry_naming_a_model_on_a_device_cites_a_scenario(card):
    quotes = [q for _, _, s in scenarios() for q in s.get("quotes", [])]
    quotes += [n["quote"] for c, n in not_scenarios() if c is card]
    for where, text in text_entries(card):
        if MODEL_WORDS.search(text) and DEVICE_WORDS.search(text):
            assert any(q in text for q in quotes), (
                f"{card.id} {where} names a model and a device but quotes no scenario: list what it works "
                f"(model, devices, batch, context) under [[scenarios]] in its notes.toml, or say under "
                f"[[not_scenarios]] why it claims nothing about capacity:\n{text}")


@pytest.mark.parametrize("card", CARDS, ids=[c.id for c in CARDS])
def test_every_test_putting_a_named_preset_on_a_named_device_cites_a_scenario(card):
    cited = {t for c, _, s in scenarios() if c is card for t in s.get("tests", [])}
    cited |= {t for c, n in not_scenarios() if c is card for t in n.get("tests", [])}
    for name, (node, source, _) in kata_test_functions(card).items():
        presets = re.findall(r'(?:preset\(|PRESETS\[|\(|\[)"((?:llama|mistral|mixtral|gpt|deepseek)[-\w.]*)"', source)
        devices = [c for c, d in DEVICE_CONSTANTS.items() if re.search(rf"\b{c}\b", source) or f'"{d}"' in source]
        if presets and devices:
            assert name in cited, (f"{card.id} {name} puts {sorted(set(presets))} on {devices}: list its "
                                   "scenarios in the card's notes.toml (or say under [[not_scenarios]] why not)")


def test_every_not_scenario_gives_a_reason_and_is_quoted():
    for card, n in not_scenarios():
        assert n.get("why", "").strip(), f"{card.id}: a not_scenario without a reason"
        assert n["quote"] in card_text(card), f"{card.id}'s notes and hints no longer say {n['quote']!r}"


# --- the check can fail ----------------------------------------------------------------------------

def test_the_fit_refuses_the_batch_once_worked_on_two_h100s():
    """Llama-2-70B, 64 sequences of 4,096 positions: 224 GB against two H100s' 171 GB."""
    s = dict(model="llama-2-70b", device="H100-SXM", count=2, batch=64, context=4096, dtype="bfloat16")
    assert not fits(s)[0]
    assert fits(s | dict(batch=24))[0] and not fits(s | dict(batch=25))[0]
    assert fits(s | dict(count=4))[0]


def test_the_fit_refuses_a_device_count_that_does_not_split_the_heads():
    with pytest.raises(ValueError, match="must divide"):
        fits(dict(model="llama-2-70b", device="H100-SXM", count=3, batch=64, context=4096, dtype="bfloat16"))


def test_the_fit_replicates_kv_heads_past_one_per_device():
    """On 16 devices Llama-2-70B's 8 KV heads are held twice: a device's cache stays one head's."""
    cfg = preset("llama-2-70b")
    one_head = 2 * cfg.n_layers * cfg.head_dim * 2 * 4096  # one KV head, 4,096 positions, bf16
    for n in (8, 16):
        assert per_device_need(cfg, n, 1, 4096, torch.bfloat16) == n_params(cfg) * 2 / n + one_head

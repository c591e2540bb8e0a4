"""The learner's failure messages (kvkata.check), in-process: wrong types named, configs shown by their fields.

A container of the wrong type, or of elements of the wrong type, is named as a number of the
wrong type is ("returned 4.0 of type float: return a Python int ...; the value is right"); call
lines show a ModelConfig by L, H, Hkv, D (and what else the kata reads), a preset by its name and
those fields, a device by its name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from kvkata import ROOT
from kvkata.check import PARAMETER_FIELDS, Mismatch, call_str, describe_config, expect_equal, expect_real
from kvref.config import ModelConfig, preset
from kvref.hardware import H100_SXM

CALL = "f(1)"


def message(got, expected, why="") -> str:
    with pytest.raises(Mismatch) as e:
        expect_equal(CALL, got, expected, why)
    return str(e.value)


# --- containers and their elements -------------------------------------------------------------

@pytest.mark.parametrize("got, expected, says", [
    ((4, 4), [4, 4], "returned (4, 4) of type tuple: return a list (list(x)); the value is right"),
    ([4, 4], (4, 4), "returned [4, 4] of type list: return a tuple (tuple(x)); the value is right"),
    (torch.tensor([4, 4]), [4, 4], "of type Tensor: return a list (x.tolist()); the value is right"),
    (frozenset({4}), {4}, "returned frozenset({4}) of type frozenset: return a set (set(x)); the value is right"),
    ({4}, [4], "returned {4} of type set: return a list (list(x)); expected [4]"),  # a set has no order
    ([("A", 1)], {"A": 1}, "of type list: return a dict; expected {'A': 1}"),
])
def test_a_container_of_the_wrong_type_is_named_with_its_fix(got, expected, says):
    assert message(got, expected).endswith(says), message(got, expected)


@pytest.mark.parametrize("got, expected, where, element", [
    ([torch.tensor(4), torch.tensor(5)], [4, 5], "[0]", "tensor(4) of type Tensor"),
    ([4, 5.0], [4, 5], "[1]", "5.0 of type float"),
    ([1, True], [1, 1], "[1]", "True of type bool"),
    ({"A": (1, 2)}, {"A": [1, 2]}, "['A']", "(1, 2) of type tuple"),
    ([[1], [torch.tensor(2)]], [[1], [2]], "[1][0]", "tensor(2) of type Tensor"),
])
def test_an_element_of_the_wrong_type_is_named_by_where_it_is(got, expected, where, element):
    text = message(got, expected)
    assert f", whose {where} is {element}: return a " in text and text.endswith("; the value is right"), text


def test_numpy_ints_in_a_list_a_set_or_as_dict_keys_are_named():
    np = pytest.importorskip("numpy")
    for got, expected, where in (([np.int64(3)], [3], "[0]"), ({np.int64(3)}, {3}, "element"),
                                 ({np.int64(3): 1}, {3: 1}, "key")):
        text = message(got, expected)
        assert f"whose {where} is np.int64(3) of type int64: return a Python int (x.item(), or int(x))" in text, text


def test_a_wrong_value_of_the_wrong_type_says_the_expected_value_and_why():
    text = message((4, 5), [4, 4], "two layers")
    assert text.endswith("return a list (list(x)); expected [4, 4] (two layers)"), text


def test_a_wrong_value_of_the_right_types_is_reported_as_a_value():
    assert message([4, 5], [4, 4]) == f"called {CALL}: returned [4, 5]; expected [4, 4]"


@pytest.mark.parametrize("got, expected", [
    ([4, 4], [4, 4]), ((1, [2.0, 3]), (1, [2.0, 3.0])), ({"A": [1]}, {"A": [1]}), ({1, 2}, {2, 1}),
    ([None, "x", 1.5], [None, "x", 1.5]),
])
def test_a_right_answer_of_the_right_types_passes(got, expected):
    expect_equal(CALL, got, expected)  # ints where floats are expected are fine, as for numbers


def test_numbers_keep_their_messages():
    assert message(4.0, 4).endswith("returned 4.0 of type float: return a Python int (int(x), or integer "
                                    "arithmetic: // not /); the value is right")
    assert message(torch.tensor(4), 4).endswith("returned tensor(4) of type Tensor: return a Python int "
                                                "(x.item(), or int(x)); the value is right")
    with pytest.raises(Mismatch, match=r"returned tensor\(2.5\) of type Tensor: return a Python float \(x.item\(\), or float\(x\)\); the value is right"):
        expect_real(CALL, torch.tensor(2.5), 2.5)


# --- configs and devices in call lines ----------------------------------------------------------

def test_a_config_is_shown_by_the_fields_that_shape_its_cache():
    gqa = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=8, n_kv_heads=2, head_dim=4, d_ff=32)
    assert call_str("kv_bytes_per_rank", gqa, 1, 2, 7) == "kv_bytes_per_rank(ModelConfig(L=2, H=8, Hkv=2, D=4), 1, 2, 7)"
    assert call_str("rope_decode_flops", ModelConfig(), 2) == "rope_decode_flops(ModelConfig(L=2, H=4, Hkv=4, D=16), 2)"


def test_a_preset_is_shown_by_its_name_and_those_fields():
    assert call_str("f", preset("llama-2-7b")) == "f(llama-2-7b(L=32, H=32, Hkv=32, D=128))"
    assert call_str("f", preset("mistral-7b")) == "f(mistral-7b(L=32, H=32, Hkv=8, D=128, W=4096))"
    assert call_str("f", preset("deepseek-v3")) == \
        "f(deepseek-v3(L=61, H=128, Hkv=128, D=128, mla_latent_dim=512, mla_rope_dim=64))"
    # A changed copy is no longer the preset: it shows as a ModelConfig.
    assert call_str("f", preset("llama-2-7b").with_(n_layers=2)) == "f(ModelConfig(L=2, H=32, Hkv=32, D=128))"


def test_a_kata_that_counts_weights_shows_them_for_a_config_but_not_for_a_preset():
    gelu = ModelConfig(n_heads=4, n_kv_heads=2, mlp="gelu")
    assert describe_config(gelu, *PARAMETER_FIELDS) == \
        "ModelConfig(L=2, H=4, Hkv=2, D=16, d_model=64, d_ff=256, V=256, mlp='gelu')"
    assert describe_config(preset("llama-3-8b"), *PARAMETER_FIELDS) == "llama-3-8b(L=32, H=32, Hkv=8, D=128)"


def test_a_device_is_shown_by_its_name_and_a_what_if_device_by_its_numbers():
    assert call_str("f", H100_SXM, H100_SXM.tensor_parallel(4)) == "f(H100-SXM, 4xH100-SXM)"
    slower = call_str("f", H100_SXM.scaled(bandwidth=0.5))
    assert slower.startswith("f(Hardware(H100-SXM: ") and "1.675 TB/s" in slower, slower


def _hand_written_configs(path: Path) -> list[str]:
    """call_str arguments that name a config by a string: Shown("preset(...)"), Shown(repr(cfg)), Shown("ModelConfig(...")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "call_str"):
            continue
        for arg in node.args[1:]:
            if not (isinstance(arg, ast.Call) and getattr(arg.func, "id", "") == "Shown" and arg.args):
                continue
            inner = arg.args[0]
            text = ast.unparse(inner)
            if (isinstance(inner, ast.Call) and getattr(inner.func, "id", "") == "repr") or \
                    "preset(" in text or "ModelConfig(" in text:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(arg)}")
    return found


def test_no_kata_test_names_a_config_by_a_hand_written_string():
    """call_str shows a config or a preset by its fields; a string in its place hides them (or drifts from them)."""
    found = [hit for path in sorted((ROOT / "katas").glob("card*/test_*.py")) for hit in _hand_written_configs(path)]
    assert found == [], "pass the ModelConfig (or preset(name)) to call_str instead:\n" + "\n".join(found)


def test_hypothesis_aside_about_other_failing_examples_reaches_the_learner_in_their_words():
    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    from kvkata import plugin

    @settings(database=None)
    @given(x=st.just(0))
    @example(x=1)
    @example(x=2)
    @example(x=3)
    def wrong(x):
        expect_equal(CALL, 0, 1, "one")

    with pytest.raises(BaseException) as e:
        wrong()
    failure = e.value.exceptions[0] if isinstance(e.value, BaseExceptionGroup) else e.value
    raw = getattr(failure, "__notes__", [])
    assert any("Verbosity.verbose" in n for n in raw), raw  # hypothesis still says it this way
    notes = plugin._learner_notes(failure)
    assert "(2 other pinned inputs of this test fail the same way)" in notes, notes
    assert not any("Verbosity" in n for n in notes), notes
    assert notes[0].startswith("Failing explicit example: wrong("), notes  # the failing input first, then the count


def test_a_failing_example_shows_a_drawn_tensor_by_dtype_and_shape_and_a_small_one_by_its_values():
    from hypothesis.vendor.pretty import pretty  # what hypothesis prints under "Failing test case"

    assert pretty(torch.zeros(2, 3, 9, 12, dtype=torch.float64)) == "<tensor float64[2, 3, 9, 12]>"
    assert pretty((torch.ones(40), 3)) == "(<tensor float32[40]>, 3)"
    assert pretty(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)) == repr(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8))


@pytest.mark.parametrize("n", [1, 2, 3, 37, 64, 65, 1000])
def test_first_where_finds_the_first_n_a_growing_measurement_passes(n):
    from kvkata.check import first_where
    asked = []
    assert first_where(lambda m: asked.append(m) or m >= n) == n
    assert len(asked) <= 2 * max(1, n).bit_length() + 1  # doubling then halving, not one call per n

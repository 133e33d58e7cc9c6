"""safe_regex.search against Python's re.search: the same answers, on patterns with repeats (the bounded-time
automaton) and without, including the literal prefilter of the automaton path."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from repack import safe_regex

ATOMS = ["a", "b", ".", r"\.", "[ab]", "(a|b)", "(ab)", "x"]
QUANT = ["", "*", "+", "?", "{1,2}"]


@st.composite
def patterns(draw):
    parts = draw(st.lists(st.tuples(st.sampled_from(ATOMS), st.sampled_from(QUANT)), min_size=1, max_size=6))
    anchor = draw(st.sampled_from(["", "^"])), draw(st.sampled_from(["", "$"]))
    return anchor[0] + "".join(a + q for a, q in parts) + anchor[1]


@settings(max_examples=400, deadline=None)
@given(patterns(), st.text(alphabet="ab.x", max_size=12))
def test_search_agrees_with_re(pattern, subject):
    assert safe_regex.search(pattern, subject) == (re.search(pattern, subject) is not None)


def test_config_keys_as_exports_write_them():
    key = r".*model\.layers\.3\.mlp\.gate.*"
    assert safe_regex.search(key, "model.layers.3.mlp.gate")
    assert not safe_regex.search(key, "model.layers.30.mlp.gate")  # the literal run "model.layers.3.mlp.gate" is absent
    assert safe_regex.search(key, "model.layers.3.mlp.gate_proj")

"""experiments/quant_quality.py's row construction (no model)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import quant_quality  # noqa: E402

PATHS = ("unet/conv_in", "unet/down_blocks_0/resnets_0/conv1", "unet/up_blocks_0/resnets_0/conv_shortcut",
         "unet/conv_out")


@pytest.mark.parametrize("pattern,w,a", [
    (None, [6, 6, 6, 6], [5, 5, 5, 5]),
    (r"conv_in$", [6, 8, 8, 8], [5, 8, 8, 8]),
    (r"resnets", [8, 6, 6, 8], [8, 5, 5, 8]),
    (r"no_such_site", [8, 8, 8, 8], [8, 8, 8, 8]),
])
def test_row_bits_apply_the_widths_only_where_the_pattern_matches(pattern, w, a):
    wv, av, hit = quant_quality.row_bits(PATHS, 6, 5, pattern)
    assert wv.tolist() == [w] and av.tolist() == [a]
    assert hit.tolist() == [x == 6 for x in w]


@pytest.mark.parametrize("entries,want,error", [
    (["conv_in=conv_in$"], [("conv_in", "conv_in$")], None),
    (["attn=attentions", "t=time_emb|time_embedding"], [("attn", "attentions"), ("t", "time_emb|time_embedding")],
     None),
    (["conv_in"], None, r"--only 'conv_in': expected NAME=REGEX"),
    (["=conv_in$"], None, r"expected NAME=REGEX"),
    (["bad=("], None, r"missing \)"),
])
def test_parse_only(entries, want, error):
    if error:
        with pytest.raises(Exception, match=error):
            quant_quality.parse_only(entries)
    else:
        assert quant_quality.parse_only(entries) == want


def test_stages_before_first_last_quantize_the_first_and_last_layer():
    assert [k for k, v in quant_quality.STAGES.items() if v["first_last_bits"]] == ["first_last", "first_last_learned",
                                                                                   "unclipped", "unclipped6"]
    # each first_last stage is an earlier stage plus the pins
    for fl, base in (("first_last", "split"), ("first_last_learned", "learned")):
        assert {**quant_quality.STAGES[base], "first_last_bits": 8} == quant_quality.STAGES[fl]
    # every stage but the last clips every site, as when its rows were measured; the last adds the unclipped sites
    assert [k for k, v in quant_quality.STAGES.items() if v["unclipped_sites"]] == ["unclipped", "unclipped6"]
    assert {**quant_quality.STAGES["first_last"], "unclipped_sites": ("ff/net_2$",)} == quant_quality.STAGES["unclipped"]
    assert {**quant_quality.STAGES["unclipped"], "unclipped_min_bits": 6} == quant_quality.STAGES["unclipped6"]


def test_the_default_config_calibrates_as_the_chosen_stage():
    path = str(Path(__file__).resolve().parents[1] / "experiments" / "configs" / "default.py")
    default, chosen = quant_quality.heldout.load_config(path), quant_quality.STAGES["unclipped"]
    assert {k: default[k] for k in chosen} == chosen

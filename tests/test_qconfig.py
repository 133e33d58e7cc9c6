"""qconfig.rewrite: the 4-bit config of each style, from hand-written 3-bit configs."""

from __future__ import annotations

import pytest

from repack import qconfig

QC = {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", "bits": 3, "group_size": 128, "sym": True,
      "extra_config": {"model.layers.0.mlp.gate": {"bits": 16, "data_type": "float"}, ".*down.*": {"bits": 2},
                       "model.layers.3.eh": {"bits": 8}}}


def test_auto_round_style_changes_only_bits_and_converted_overrides():
    out = qconfig.rewrite(QC, "auto-round", [".*kv_b_proj.*"], {"model.layers.9.mtp": 4})
    assert {k: v for k, v in out.items() if k != "extra_config"} == {**{k: v for k, v in QC.items() if k != "extra_config"}, "bits": 4}
    assert out["extra_config"] == {
        "model.layers.0.mlp.gate": {"bits": 16, "data_type": "float"},
        ".*down.*": {"bits": 4},
        "model.layers.3.eh": {"bits": 8},
        ".*kv_b_proj.*": {"bits": 16, "data_type": "float"},
        "model.layers.9.mtp": {"bits": 4},
    }
    assert QC["bits"] == 3 and QC["extra_config"][".*down.*"] == {"bits": 2}, "the input was changed"


def test_gptq_style_writes_dynamic_rules():
    out = qconfig.rewrite(QC, "gptq", [".*kv_b_proj.*"], {"model.layers.3.eh": 8})
    assert out["quant_method"] == "gptq" and out["bits"] == 4 and out["sym"] is True and out["desc_act"] is False
    assert out["checkpoint_format"] == "gptq" and out["group_size"] == 128
    assert out["dynamic"] == {
        r"-:model\.layers\.0\.mlp\.gate$": {},
        "-:.*kv_b_proj.*": {},
        r"+:model\.layers\.3\.eh$": {"bits": 8},
    }


def test_unknown_style_is_refused():
    with pytest.raises(ValueError, match="unknown config style"):
        qconfig.rewrite(QC, "awq", [], {})

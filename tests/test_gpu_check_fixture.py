"""The CPU parts of ``scripts/gpu_check.py --fixture``: converting a real AutoRound export, its float reference
(judged by AutoRound's own QuantLinear and loaded by transformers), the engines planned per family, and the verdict
on MTP speculation runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

torch = pytest.importorskip("torch")
pytest.importorskip("auto_round")
pytest.importorskip("transformers")

import autoround_fixtures as arf  # noqa: E402
import conftest_autoround  # noqa: E402

from scripts import gpu_check as gc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
autoround_fixture = conftest_autoround.autoround_fixture  # the session-cached AutoRound exports
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


LOAD_FLOAT = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, output_loading_info=True)
print(json.dumps({k: sorted(map(str, info[k])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
                 | {"state_dict": sorted(model.state_dict())}))
"""


@pytest.mark.parametrize("family", ["glm4_moe", "qwen3_moe"])
def test_fixture_build_and_exact_float_reference(autoround_fixture, tmp_path, family):
    """glm4_moe: sharded (AutoRound puts its MTP layer in a second file), with a 4-bit MTP layer; qwen3_moe: one file."""
    src = autoround_fixture(family, 128)
    built = gc.build(tmp_path / "work", src)
    assert (built.family, built.vocab, built.src) == (family, 512, src.resolve())
    assert built.dst.parent == tmp_path / "work" / src.name
    assert (built.mtp_layers, built.native is not None) == ((1, True) if family == "glm4_moe" else (0, False))
    for out in filter(None, (built.dst, built.native)):
        assert subprocess.run([sys.executable, "-m", "repack", "verify", str(src), str(out)], cwd=ROOT,
                              capture_output=True).returncode == 0, out
    if built.native is not None:
        assert json.loads((built.native / "config.json").read_text())["quantization_config"]["bits"] == 3

    s_t, r_t = arf.read_checkpoint(src), arf.read_checkpoint(built.ref)
    mods = arf.quantized_modules(s_t)
    module_tensors = {f"{m}.{k}" for m, d in mods.items() for k in d if k != "bias"}
    assert set(r_t) == (set(s_t) - module_tensors) | {f"{m}.weight" for m in mods}
    widths = set()
    for m, d in mods.items():
        bits = arf.module_bits(d)
        widths.add(bits)
        want = arf.autoround_dequant(d["qweight"], d["qzeros"], d["scales"], bits, arf.module_group_size(d), exact=True)
        assert arf.bits_equal(r_t[f"{m}.weight"], want), m
    assert widths == ({3, 4} if family == "glm4_moe" else {3})
    for name in set(s_t) - module_tensors:
        assert arf.bits_equal(r_t[name], s_t[name]), name
    cfg, s_cfg = (json.loads((d / "config.json").read_text()) for d in (built.ref, src))
    assert cfg == {k: v for k, v in s_cfg.items() if k != "quantization_config"}
    index = json.loads((built.ref / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(r_t)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in r_t.values())

    # transformers reads it as a plain float model: nothing missing, nothing but an MTP layer left over (unbuilt).
    # In a fresh process: auto-round, once imported, patches transformers' MoE classes and weight conversions.
    r = subprocess.run([sys.executable, "-c", LOAD_FLOAT, str(built.ref)], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    n = s_cfg["num_hidden_layers"]
    assert all(k.startswith(f"model.layers.{n}.") for k in info["unexpected_keys"]), info
    assert not any(k.startswith(f"model.layers.{n}.") for k in info["state_dict"])
    assert any(".mlp.experts." in k for k in info["state_dict"])


def test_engines_per_family(autoround_fixture, tmp_path):
    pr = gc.prompts(512)
    assert all(0 <= i < 512 for rnd in pr.values() for ids in rnd.values() for i in ids)
    glm = gc.build(tmp_path, autoround_fixture("glm4_moe", 128))
    jobs = {name: spec for name, _, spec in gc.engine_jobs(glm, ["float16"], [1], 24, pr, native=True)}
    assert list(jobs) == ["ref-float16", "w3-tp1-float16", "w4-tp1-float16", "w4marlin-tp1-float16",
                          "w4mtp-tp1-float16", "w3mtp-tp1-float16", "nativemtp-tp1-float16"]
    assert {s["attention_backend"] for s in jobs.values()} == {"TRITON_ATTN"}
    mtp = {"method": "glm4_moe_mtp", "num_speculative_tokens": 1}
    assert {n: s["model"] for n, s in jobs.items() if s.get("speculative") == mtp} == {
        "w4mtp-tp1-float16": str(glm.dst), "w3mtp-tp1-float16": str(glm.src), "nativemtp-tp1-float16": str(glm.native)}
    before_030 = [n for n, _, _ in gc.engine_jobs(glm, ["float16"], [1, 2], 24, pr, native=False, mtp_method="mtp")]
    assert before_030 == ["ref-float16", "w3-tp1-float16", "w4-tp1-float16", "w4-tp2-float16", "w4mtp-tp1-float16"]

    ds = gc.build(tmp_path, autoround_fixture("deepseek_v3", 128))
    # transformers writes num_nextn_predict_layers: 1 without any MTP tensor: no MTP run
    assert json.loads((ds.src / "config.json").read_text())["num_nextn_predict_layers"] == 1 and ds.mtp_layers == 0
    jobs = {name: spec for name, _, spec in gc.engine_jobs(ds, ["float16"], [1], 24, pr, native=True)}
    assert not any(s.get("speculative") for s in jobs.values())
    assert {s["attention_backend"] for s in jobs.values()} == {"TRITON_MLA"}
    q3 = gc.build(tmp_path, autoround_fixture("qwen3_moe", 128))
    assert {s["attention_backend"] for _, _, s in gc.engine_jobs(q3, ["float16"], [1], 24, pr, True)} == {"TRITON_ATTN"}


def test_cli_build_only_and_bad_fixture(autoround_fixture, tmp_path):
    src = autoround_fixture("glm4_moe", 128)
    cmd = [sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"), "--build-only"]
    r = subprocess.run(cmd + ["--fixture", str(src)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    paths = json.loads((tmp_path / "out" / "results.json").read_text())["paths"]
    assert (paths["family"], paths["mtp_layers"], paths["ref"]) == ("glm4_moe", 1, str(tmp_path / "w" / src.name / "ref"))
    for bad, msg in ((paths["dst"], "not a 3-bit checkpoint (quantization_config bits 4)"), (str(tmp_path / "none"), "no such folder")):
        r = subprocess.run(cmd + ["--fixture", bad], cwd=ROOT, capture_output=True, text=True)
        assert (r.returncode, r.stdout) == (2, ""), r
        assert r.stderr.startswith("error: ") and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr


def _record(pr: dict, tokens: list[int], **kw) -> dict:
    """An engine record that answers every prompt with ``tokens`` (log-prob -0.1 each, a prefix hit, no salted hit)."""
    res = {n: {"tokens": tokens, "logprobs": [{str(t): -0.1} for t in tokens], "prompt_len": len(ids),
               "num_cached_tokens": 0 if n.endswith("salted") else (688 if n.endswith("cached") else None)}
           for rnd in pr.values() for n, ids in rnd.items()}
    return dict({"rc": 0, "info": {"load_seconds": 1}, "seconds": 2, "results": res, "kernel_lines": ["Using X MoE backend"]}, **kw)


def test_evaluate_mtp_runs():
    """Speculation on the converted model is strict; the 3-bit source and native runs with it are information."""
    pr = gc.prompts(512)
    expect = {"native_served": True, "w4_marlin_by_default": False}
    eng = {"ref-float16": _record(pr, [5, 6, 7]), "w4-tp1-float16": _record(pr, [5, 6, 7]),
           "w4mtp-tp1-float16": _record(pr, [5, 6, 7]),
           "w3mtp-tp1-float16": {"rc": 1, "log_tail": "RuntimeError: The size of tensor a (96) must match",
                                 "speculative": {"method": "glm4_moe_mtp", "num_speculative_tokens": 1}},
           "nativemtp-tp1-float16": _record(pr, [5, 9, 7])}
    rows = {r["check"]: r["status"] for r in gc.evaluate(eng, pr, {"float16"}, expect)}
    assert rows["w4mtp-tp1-float16 vs w4-tp1-float16 (or float ref): long_700"] == "PASS"
    assert rows["w4mtp-tp1-float16 vs float ref: short_4"] == "PASS"
    details = {r["check"]: r["detail"] for r in gc.evaluate(eng, pr, {"float16"}, expect)}
    assert rows["w3mtp-tp1-float16 serves (information)"] == "INFO"
    assert details["w3mtp-tp1-float16 serves (information)"].startswith("glm4_moe_mtp speculation fails: rc=1 | Runtime")
    assert rows["nativemtp-tp1-float16 vs float ref: short_4"] == "WARN"
    assert not any(s == "FAIL" for s in rows.values())
    eng["w4mtp-tp1-float16"] = _record(pr, [5, 9, 7])
    rows = {r["check"]: r["status"] for r in gc.evaluate(eng, pr, {"float16"}, expect)}
    assert rows["w4mtp-tp1-float16 vs w4-tp1-float16 (or float ref): short_17"] == "FAIL"
    assert rows["w4mtp-tp1-float16 vs float ref: short_17"] == "FAIL"

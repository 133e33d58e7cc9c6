"""The hub model card carries the serve planner's numbers and the launcher's command; push uploads what it says."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from repack import card, push
from repack.convert import convert
from repack.output import MANIFEST_NAME
from repack.plan import Options
from repack.run import RunConfig
from repack.serve import launcher, planner, recipes
from repack.verify import verify

REPO = "me/tiny-w4"


@pytest.fixture
def out_copy(converted, tmp_path) -> Path:
    return Path(shutil.copytree(converted[1], tmp_path / "out"))


def expected_rows(dst: Path) -> dict[str, tuple[planner.Model, planner.Request, dict]]:
    """Label -> (model, request, plan), built here from the recipe TOML and the GPU facts, not through the card."""
    model = planner.load_model(dst)
    rows = {}
    for name in recipes.names():
        r = recipes.load(name)
        hw, sv = r["hardware"], r["serve"]
        gpu = planner.Gpu(hw["gpus"], hw["gpu_memory_gib"], hw["compute_capability"], hw.get("gpu_name"))
        req = planner.Request(tp=hw["gpus"], gpu=gpu, max_model_len=sv.get("max_model_len"),
                              kv_cache_dtype=sv.get("kv_cache_dtype", "auto"),
                              utilization=sv.get("gpu_memory_utilization", planner.DEFAULT_UTILIZATION),
                              cpu_offload_gib=sv.get("cpu_offload_gb", 0.0), consumer_pcie=hw.get("consumer_pcie"),
                              extra_args=sv.get("extra_args", []))
        rows[f"`{name}`"] = (model, req, planner.plan(model, req))
    for n, mem, cc in [(1, 80.0, "9.0"), (2, 80.0, "9.0"), (4, 80.0, "9.0"), (8, 80.0, "9.0"), (8, 24.0, "8.6")]:
        req = planner.Request(tp=n, gpu=planner.Gpu(n, mem, cc))
        rows[f"generic {n}x{mem:g} GiB"] = (model, req, planner.plan(model, req))
    return rows


def table(text: str) -> dict[str, list[str]]:
    body = text.split("## Memory plan", 1)[1].split("## Serve with vLLM", 1)[0]
    lines = [ln for ln in body.splitlines() if ln.startswith("| ") and not ln.startswith("| setup")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines)}


def test_memory_table_carries_the_planners_numbers(converted):
    converted = converted[1]
    text = card.build_card(converted, REPO)
    rows, want = table(text), expected_rows(converted)
    assert list(rows) == list(want)
    for label, (_, req, p) in want.items():
        gpus, cc, weights, kv, ctx, fits = rows[label]
        assert (gpus, cc) == (f"{req.gpu.count} x {req.gpu.memory_gib:g} GiB", req.gpu.cc), label
        assert float(weights) == p.weights_gib_per_gpu, label
        assert int(kv.replace(",", "")) == p.kv_bytes_per_token, label
        assert int(ctx.replace(",", "")) == p.max_model_len, label
        assert fits == ("yes" if p.fits else "no"), label
        for w in p.warnings:
            assert text.count(w.split(". ", 1)[0].rstrip(".")) == 1, w
    cfg = json.loads((converted / "config.json").read_text())
    mla = (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * cfg["num_hidden_layers"] * 2
    assert {int(r[3].replace(",", "")) for r in rows.values()} == {mla}
    assert rows["generic 1x80 GiB"][4:] == [f"{cfg['max_position_embeddings']:,}", "yes"]
    assert rows["`deepseek-v3.2-reap-345b-w3a16-8xa100-40g`"][4:] == ["65,536", "no"]
    assert "no memory plan" not in text


def test_serve_command_is_the_launchers_for_the_smallest_fitting_setup(converted):
    converted = converted[1]
    text = card.build_card(converted, REPO)
    model, req, p = expected_rows(converted)["generic 1x80 GiB"]
    assert p.fits
    argv = launcher.command(REPO, p, launcher.version_flags(launcher.DEFAULT_VLLM, model, req.gpu))
    serve = text.split("## Serve with vLLM", 1)[1]
    assert serve.split("```bash\n", 1)[1].split("\n```", 1)[0] == shlex.join(argv)
    assert argv[:5] == ["vllm", "serve", REPO, "--tensor-parallel-size", "1"]
    assert f"w3repack launch {REPO} --gpus N -o serve.sh" in serve


def test_serve_command_when_no_generic_setup_fits(converted, monkeypatch):
    converted = converted[1]
    model = planner.load_model(converted)
    # the smallest card on which the plan at 0.9 does not fit, but an alternative (0.95, or PP) does
    mem = next(m / 100 for m in range(80, 600) if not (p := planner.plan(model, planner.Request(
        tp=1, gpu=planner.Gpu(1, m / 100, "9.0")))).fits and p.alternatives)
    monkeypatch.setattr(card, "GENERIC", [(1, mem, "9.0")])
    text = card.build_card(converted, REPO)
    req = planner.Request(tp=1, gpu=planner.Gpu(1, mem, "9.0"))
    p = planner.plan(model, req)
    assert not p.fits and p.alternatives
    argv = launcher.command(REPO, p, launcher.version_flags(launcher.DEFAULT_VLLM, model, req.gpu))
    assert f"```bash\n{shlex.join(argv)}\n```" in text
    assert "No generic setup fits" in text and p.reason in text
    assert f"Alternatives: {p.alternatives[0]['description']}" in text


def test_no_memory_plan_when_the_config_has_no_kv_shape(out_copy):
    cfg = json.loads((out_copy / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (out_copy / "config.json").write_text(json.dumps(cfg))
    text = card.build_card(out_copy, REPO)
    assert "no memory plan: " in text and "config.json: num_hidden_layers is missing" in text
    assert not table(text) and "--max-model-len LEN" in text


def test_verification_from_argument_then_manifest_then_hint(out_copy, traps_ckpt):
    assert "Re-check it with `w3repack verify" in card.build_card(out_copy, REPO)
    rep = verify(traps_ckpt, out_copy).to_json()
    assert rep["ok"]
    man = json.loads((out_copy / MANIFEST_NAME).read_text())
    man["verify"] = rep
    (out_copy / MANIFEST_NAME).write_text(json.dumps(man))
    n = sum(rep["tensors_checked"].values())
    text = card.build_card(out_copy, REPO)
    assert f"**identical**, {n} tensors" in text and "Re-check it" not in text
    text = card.build_card(out_copy, REPO, verify_report={**rep, "ok": False})
    assert f"**DIFFERENT**, {n} tensors" in text


def test_unrecorded_hashes_read_not_recorded(traps_ckpt, tmp_path):
    dst = tmp_path / "nohash"
    convert(traps_ckpt, dst, Options(), RunConfig(workers=1, hashes=False))
    man = json.loads((dst / MANIFEST_NAME).read_text())
    assert all(s["sha256"] is None for s in man["output_shards"])
    text = card.build_card(dst, REPO)
    rows = [ln for ln in text.splitlines() if ln.startswith("| model-")]
    assert len(rows) == len(man["output_shards"])
    assert all(ln.count("`not recorded`") == 2 for ln in rows)


def test_push_creates_private_repo_and_one_commit_with_the_card(out_copy, monkeypatch):
    """``hf upload`` conventions: the repo is created (private), a branch for --revision, then one commit holding
    every visible file and the generated card, with the commit message and --create-pr passed on."""
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, *a, **kw):
            calls.append(("init", a, kw))

        def create_repo(self, *args, **kw):
            calls.append(("create_repo", args, kw))

        def create_branch(self, *args, **kw):
            calls.append(("create_branch", args, kw))

        def create_commit(self, *args, **kw):
            calls.append(("create_commit", args, kw))
            return type("Info", (), {"commit_url": f"https://huggingface.co/{args[0]}/commit/abc", "pr_url": None})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    (out_copy / ".w3repack").mkdir(exist_ok=True)
    (out_copy / ".w3repack" / "state.json").write_text("{}")
    (out_copy / ".hidden").write_text("x")

    summary = push.push(out_copy, REPO, private=True, revision="w4", commit_message="hello", token="hf_x")
    assert [c[0] for c in calls] == ["init", "create_repo", "create_branch", "create_commit"]
    assert calls[0][2] == {"token": "hf_x"}
    assert calls[1][1] == (REPO,) and calls[1][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    assert calls[2][2]["branch"] == "w4"
    args, kw = calls[3][1], calls[3][2]
    assert args[0] == REPO and kw["commit_message"] == "hello" and kw["revision"] == "w4" and kw["create_pr"] is False
    ops = {op.path_in_repo: op for op in args[1]}
    files = sorted(p.relative_to(out_copy).as_posix() for p in out_copy.rglob("*") if p.is_file())
    assert set(ops) == {f for f in files if not f.startswith(".")}
    assert {p.name for p in out_copy.glob("*.safetensors")} <= set(ops)
    text = card.build_card(out_copy, REPO)
    assert ops["README.md"].path_or_fileobj == text.encode() == summary["card"].encode()
    assert "## Memory plan" in text and summary["private"] and summary["url"].endswith("/commit/abc")

"""SGLang beyond DeepSeek, through the engine interface: the 4-bit conversions of full-size header-only replicas of
Qwen3-235B-A22B and GLM-4.6 (and the DeepSeek-V3.2-REAP-345B output) planned for 4 x H200, their argv and SGLang's
memory rule against hand computations (tests/replica*.py), golden launchers run by real bash against fake tools
(the argv the fake server receives, byte for byte), the TP 8 verdicts, and what the SGLang engine refuses.
SGLang itself is not imported: everything here is read from its sources (docs/serving.md), not run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from repack import synth
from repack.convert import convert
from repack.errors import UserError
from repack.plan import Options
from repack.serve import engines, launcher, paths, planner
from repack.serve import sglang as sg
from tests.fakeengines import b, fake_tools, recorded, run_script
from tests.helpers import assert_refused, w3repack_in_process
from tests.replica import KV_LORA, ROPE, hand_weights_per_gpu, write_replica, write_sparse
from tests.replica_families import glm_hand, glm_kv_bytes, qwen3_hand, qwen3_kv_bytes, write_glm46, write_qwen3_235b

GIB = 1 << 30
GOLDEN = Path(__file__).parent / "golden"
H200_MIB = 143770  # nvidia-smi's memory.total of an H200 (140.4 GiB), as the fake reports it
SGLANG = engines.engine_for("sglang")
# SGLang's default --mem-fraction-static on a 140.4 GiB card at TP 4 (docs/serving.md): reserve 512 + 8192 x 1.5
# (chunked prefill) + 4/8 x 1024 + 512 x 2 (decode graphs) = 14336 MiB for GQA, + 1536 MLA prefill graphs = 15872;
# F = round((143769.6 - reserve) / 143769.6, 3). P = 140.4 - 0.5 (CUDA context) - 0.5 (NCCL) GiB.
F_GQA, F_MLA, P = 0.9, 0.89, 139.4


def _write_conversion(source: planner.Model, dst: Path) -> planner.Model:
    """A header-only replica of what ``w3repack convert`` writes from ``source`` (4-bit), loaded."""
    conv, _ = paths.virtual_output(source)
    dst.mkdir(parents=True)
    write_sparse(dst / "model.safetensors", [(n, d, list(s)) for n, d, s, _ in conv.tensors])
    (dst / "config.json").write_text(json.dumps(conv.config))
    return planner.load_model(dst)


@pytest.fixture(scope="module")
def qwen3_w4(tmp_path_factory):
    d = tmp_path_factory.mktemp("q235s")
    return _write_conversion(planner.load_model(write_qwen3_235b(d / "src")), d / "Qwen3-235B-A22B-W4A16")


@pytest.fixture(scope="module")
def glm_w4(tmp_path_factory):
    d = tmp_path_factory.mktemp("glm46s")
    return _write_conversion(planner.load_model(write_glm46(d / "src")), d / "GLM-4.6-W4A16")


@pytest.fixture(scope="module")
def deepseek_w4(tmp_path_factory):
    return planner.load_model(write_replica(tmp_path_factory.mktemp("r345s") / "DeepSeek-V3.2-REAP-345B-W4A16"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A converted tiny DeepSeek (2 layers and an MTP layer, MLA)."""
    root = tmp_path_factory.mktemp("tiny")
    synth.write_checkpoint(root / "w3", synth.TinySpec.small())
    convert(root / "w3", root / "w4", Options())
    return root / "w4"


def _request(model: planner.Model, gpus: int, **kw) -> planner.Request:
    _, req, _ = launcher.prepare(str(model.root), gpus, 140.4, "9.0", probe=False, model=model, **kw)
    return req


def _argv(model_path: str, tp: int, fraction: float, context: int, *between: str) -> list[str]:
    return ["python3", "-m", "sglang.launch_server", "--model-path", model_path, "--tp-size", str(tp), "--ep-size", str(tp),
            "--dtype", "float16", *between, "--mem-fraction-static", f"{fraction:g}", "--context-length", str(context),
            "--host", "127.0.0.1", "--port", "30000"]


def _golden(name: str, text: str) -> None:
    """Compare with tests/golden/NAME (regenerate with W3REPACK_REGEN_GOLDEN=1 and review the diff)."""
    path = GOLDEN / name
    if os.environ.get("W3REPACK_REGEN_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def _check_script(launch, golden: str, tmp_path: Path) -> None:
    """The launcher passes bash -n, matches its golden, and hands the fake server ``launch.argv`` exactly."""
    text = SGLANG.script(launch)
    script = tmp_path / "serve.sh"
    script.write_bytes(b(text))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    _golden(golden, text)
    tools, rec = fake_tools(tmp_path / "t", gpus=4, mib=H200_MIB)
    (tmp_path / "w").mkdir()
    r = run_script(script, tools, cwd=tmp_path / "w")
    assert r.returncode == 0, r.stderr
    assert recorded(rec, "python3") == [b(a) for a in launch.argv[1:]]


def test_gqa_kv_bytes_per_token_by_hand(qwen3_w4, glm_w4):
    """K and V of the GPU's KV heads (at least one, replicated beyond), 128 values of 2 bytes, every layer."""
    q, g = sg.facts(qwen3_w4), sg.facts(glm_w4)
    assert [sg.kv_bytes_per_token(q, tp) for tp in (1, 2, 4, 8)] == [2 * h * 128 * 2 * 94 for h in (4, 2, 1, 1)]
    assert [sg.kv_bytes_per_token(g, tp) for tp in (1, 4, 8)] == [2 * h * 128 * 2 * 92 for h in (8, 2, 1)]
    assert sg.kv_bytes_per_token(q, 4) == qwen3_kv_bytes(4) and sg.kv_bytes_per_token(g, 4) == glm_kv_bytes(4)
    assert not q.mla and q.moe_quantized and q.quant_bits == {4: 94 * (4 + 3 * 128)}


def test_qwen3_235b_at_tp4_golden(qwen3_w4, tmp_path):
    mp = "/models/Qwen3-235B-A22B-W4A16"
    L = SGLANG.plan(qwen3_w4, _request(qwen3_w4, 4), model_path=mp, version="0.5.19")
    w = qwen3_hand(4, bits=4) / GIB  # routed experts whole per GPU under --ep-size: the same bytes on average
    pool = F_GQA * P - w
    assert L.memory.weights_gib_per_gpu == pytest.approx(w, abs=6e-4)
    assert L.memory.kv_bytes_per_token == 48128 and L.memory.kv_cache_gib == pytest.approx(pool, abs=2e-3)
    assert abs(L.memory.capacity_tokens - pool * GIB / 48128) < 0.002 * GIB / 48128
    # no --attention-backend for GQA: SGLang's own default (FA3 on Hopper for Qwen3MoeForCausalLM)
    assert L.argv == _argv(mp, 4, F_GQA, 40960)  # context: the model's max_position_embeddings, the pool holds more
    assert L.memory.fits and L.gpus == 4 and L.path == paths.REPACKED and L.env == {}
    _check_script(L, "qwen3-235b-a22b-w4a16-4xh200-sglang.sh", tmp_path)


def test_glm46_at_tp4_golden(glm_w4, tmp_path):
    mp = "/models/GLM-4.6-W4A16"
    L = SGLANG.plan(glm_w4, _request(glm_w4, 4), model_path=mp, version="0.5.19")
    w = glm_hand(4, bits=4) / GIB  # without the MTP layer: SGLang skips layers.92 unless speculating
    pool = F_GQA * P - w
    assert L.memory.weights_gib_per_gpu == pytest.approx(w, abs=6e-4)
    assert L.memory.kv_bytes_per_token == 94208 and L.memory.kv_cache_gib == pytest.approx(pool, abs=2e-3)
    assert L.argv == _argv(mp, 4, F_GQA, 202752)
    assert L.memory.fits and L.sglang.layout_problems == []
    _check_script(L, "glm-4.6-w4a16-4xh200-sglang.sh", tmp_path)


def test_deepseek_345b_at_tp4_golden(deepseek_w4, tmp_path):
    mp = "/models/DeepSeek-V3.2-REAP-345B-W4A16"
    L = SGLANG.plan(deepseek_w4, _request(deepseek_w4, 4), model_path=mp, version="0.5.19")
    w = hand_weights_per_gpu(4) / GIB
    kv = ((KV_LORA + ROPE) * 2 + 132) * 61  # MLA latent + rope in 16-bit on every GPU, DSA indexer cache
    assert L.memory.weights_gib_per_gpu == pytest.approx(w, abs=6e-4)
    assert L.memory.kv_bytes_per_token == kv and L.memory.kv_cache_gib == pytest.approx(F_MLA * P - w, abs=2e-3)
    assert L.argv == _argv(mp, 4, F_MLA, 163840)  # DSA: the attention backend is SGLang's own choice
    assert any("pairing is unverified" in x for x in L.warnings)
    _check_script(L, "deepseek-v3.2-reap-345b-w4a16-4xh200-sglang.sh", tmp_path)


def test_qwen3_at_tp8_runs_under_sglangs_expert_parallel_layout(qwen3_w4):
    """vLLM's TP 8 splits the 1536-wide experts into 192 rows (not whole groups of 128); SGLang's launch always
    passes --ep-size for GPTQ experts, so experts stay whole and the rest splits cleanly: one KV head per GPU."""
    req = _request(qwen3_w4, 8)
    assert planner.problems(qwen3_w4, req)  # what keeps the vLLM plan of the same request from fitting
    L = SGLANG.plan(qwen3_w4, req, model_path="/m", version="0.5.19")
    fraction = 0.897  # reserve 512 + 12288 + 8/8 x 1024 + 1024 = 14848 MiB of 143769.6
    assert L.argv == _argv("/m", 8, fraction, 40960)
    assert L.memory.fits and L.sglang.fits and L.sglang.layout_problems == []
    assert L.memory.kv_bytes_per_token == qwen3_kv_bytes(8)
    assert L.memory.weights_gib_per_gpu == pytest.approx(qwen3_hand(8, bits=4) / GIB, abs=6e-4)


def test_glm46_at_tp8_shared_expert_does_not_split(glm_w4, tmp_path):
    """GLM's shared expert stays split by TP under --ep-size (its fusion into the routed experts is off under
    expert parallelism on NVIDIA GPUs): its down projection has 1536 / 8 = 192 input rows per GPU, 1.5 groups.
    One verdict: the launch is refused, and with --force the script says NO."""
    req = _request(glm_w4, 8)
    with pytest.raises(UserError, match=r"SGLang plan does not fit: TP 8 with --ep-size 8 does not split the model "
                                        r"into whole ranks: .*shared_experts\.down_proj"):
        SGLANG.plan(glm_w4, req, version="0.5.19")
    L = SGLANG.plan(glm_w4, req, model_path="/m", version="0.5.19", force=True)
    assert not L.memory.fits and L.sglang.memory.fits  # the memory alone would fit
    assert "fits: NO: TP 8 with --ep-size 8 does not split" in SGLANG.script(L)


def test_engine_registry_and_cli_choices():
    from repack.cli.serve import Engine

    assert [e.value for e in Engine] == engines.names() == ["vllm", "sglang"]
    assert isinstance(engines.engine_for("sglang"), engines.Engine)
    with pytest.raises(UserError, match="--engine 'tgi': expected one of vllm, sglang"):
        engines.engine_for("tgi")
    assert engines.engine_for("vllm").version("0.30.1+cu128") == "0.30.1+cu128"
    assert SGLANG.version("0.5.19") == "0.5.19"


def _refused(*args: str) -> str:
    code, _, err = w3repack_in_process(*args)
    return assert_refused(subprocess.CompletedProcess(args, code, "", err))


@pytest.mark.parametrize("args,needle", [
    (["--speculative", "1"], "--speculative --engine sglang: MTP speculative decoding is not planned for SGLang"),
    (["--gpus", "2", "--pipeline-parallel", "2"], "--pipeline-parallel 2 / --nodes --engine sglang"),
    (["--nodes", "2"], "--pipeline-parallel 2 / --nodes --engine sglang"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8 --engine sglang"),
    (["--path", "native"], "--path native --engine sglang: SGLang does not load 3-bit checkpoints"),
    (["--vllm-version", "0.33.0"], "--vllm-version 0.33.0: the launch is for --engine sglang"),
])
def test_sglang_refuses_what_it_does_not_plan(tiny, tmp_path, args, needle):
    """Each of these was dropped without a word before: the script served something else than asked."""
    out = tmp_path / "s.sh"
    gpu = [] if "--gpus" in args else ["--gpus", "1"]
    _refused("launch", tiny, "-o", out, "--engine", "sglang", *gpu, "--gpu-memory", "80", "--compute-capability", "9.0",
             *args)
    assert not out.exists()
    if "--vllm-version" not in args and "--nodes" not in args:
        _refused("serve", tiny, "--dry-run", "--engine", "sglang", *gpu, "--gpu-memory", "80", "--compute-capability", "9.0",
                 *args)


def test_sglang_refuses_a_rehearsal_and_an_architecture_it_has_no_rules_for(tiny, qwen3_w4):
    m = planner.load_model(tiny)
    with pytest.raises(UserError, match="--rehearsal --engine sglang: a rehearsal measures vLLM"):
        SGLANG.check(m, _request(m, 1), rehearsal=object())
    mixtral = planner.Model(qwen3_w4.root, {**qwen3_w4.config, "architectures": ["MixtralForCausalLM"]}, qwen3_w4.tensors)
    with pytest.raises(UserError, match="architecture MixtralForCausalLM: the SGLang launcher has rules for .*Qwen3Moe"):
        SGLANG.check(mixtral, _request(qwen3_w4, 4))


def test_serve_dry_run_prints_what_launch_writes(tiny, tmp_path, monkeypatch):
    """``serve`` and ``launch`` take the same engine plan: the dry-run command is the script's argv. ``serve`` plans
    for the installed SGLang (here said to be 0.5.19: the default 0.5.17 refuses this DeepSeek model)."""
    monkeypatch.setattr(sg, "installed_sglang", lambda: "0.5.19")
    base = ["--engine", "sglang", "--gpus", "1", "--gpu-memory", "80", "--compute-capability", "9.0", "--", "--port", "9001"]
    code, out, err = w3repack_in_process("serve", tiny, "--dry-run", *base)
    assert code == 0, err
    s = tmp_path / "s.sh"
    code, said, err = w3repack_in_process("launch", tiny, "-o", s, "--sglang-version", "0.5.19", *base)
    assert code == 0, err
    assert "repacked-4bit path, 1 GPUs" in said and "flags for SGLang 0.5.19" in said
    tools, rec = fake_tools(tmp_path / "t", gpus=1, mib=81920)
    assert run_script(s, tools).returncode == 0
    got = [a.decode() for a in recorded(rec, "python3")]
    assert out.split() == ["python3", *got] and got[-2:] == ["--port", "9001"]


def test_deepseek_with_quantized_mla_projections_is_refused_on_the_releases_that_read_their_weight(tiny, tmp_path):
    """SGLang 0.5.15 failed to build the converted tiny DeepSeek on ``fused_qkv_a_proj_with_mqa.weight`` and 0.5.17
    on ``q_b_proj.weight`` (GPTQ-packed modules have neither, docs/validation.md); the lines are in 0.5.10-0.5.15
    and 0.5.16-0.5.18. ``launch`` refuses those versions with one error line naming the module and exit 2, writes
    nothing, and a script written for 0.5.19 refuses them at preflight."""
    base = ["--engine", "sglang", "--gpus", "1", "--gpu-memory", "80", "--compute-capability", "9.0"]
    for bad, module in (("0.5.10", "fused_qkv_a_proj_with_mqa"), ("0.5.15", "fused_qkv_a_proj_with_mqa"),
                        ("0.5.16", "q_b_proj"), ("0.5.17", "q_b_proj"), ("0.5.18.post1", "q_b_proj")):
        s = tmp_path / f"{bad}.sh"
        code, out, err = w3repack_in_process("launch", tiny, "-o", s, "--sglang-version", bad, *base)
        assert code == 2 and not s.exists(), (bad, code, err)
        assert err.count("error:") == 1 and f"reads {module}.weight" in err and "0.5.10-0.5.18 cannot build" in err, err
    code, _, err = w3repack_in_process("launch", tiny, "-o", tmp_path / "0.5.19.sh", "--sglang-version", "0.5.19", *base)
    assert code == 0, err
    for installed, rc in (("0.5.10", 1), ("0.5.15", 1), ("0.5.17", 1), ("0.5.18", 1), ("0.5.19", 0), ("0.5.23", 0)):
        tools, rec = fake_tools(tmp_path / f"t{installed}", gpus=1, mib=81920, sglang=installed)
        r = run_script(tmp_path / "0.5.19.sh", tools)
        assert (r.returncode != 0) == bool(rc), (installed, r.stderr)
        assert (b"cannot build this DeepSeek model" in r.stderr) == bool(rc)
        assert (b"outside 0.5.10-0.5.18" in r.stderr) == bool(rc)
        assert (rec / "python3.argv").exists() != bool(rc)

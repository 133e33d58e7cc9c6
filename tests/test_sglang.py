"""SGLang launcher: command lines against hand-written expectations, SGLang's memory rule against a hand
computation, version checks, refusal of the 3-bit source. CPU only; SGLang itself is not imported."""

import math
import subprocess

import pytest

from repack import synth
from repack.convert import convert
from repack.errors import UserError
from repack.plan import Options
from repack.serve import planner, recipes
from repack.serve import sglang as sg
from tests.replica import PLACEHOLDER, hand_weights_per_gpu, write_replica

GIB = 1 << 30
KV_345B = (576 * 2 + 132) * 61  # MLA latent + rope in 16-bit, DSA indexer 128 fp8 + 4-byte scale, 61 layers


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return planner.load_model(write_replica(tmp_path_factory.mktemp("r345s") / "DeepSeek-V3.2-REAP-345B-W4A16"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    synth.write_checkpoint(d / "src3", synth.TinySpec())
    convert(d / "src3", d / "dst4", Options())
    return planner.load_model(d / "src3"), planner.load_model(d / "dst4")


W8 = hand_weights_per_gpu(8) / GIB


def test_345b_8x3090_golden(replica):
    rec = recipes.load("deepseek-v3.2-reap-345b-w3a16-8x3090")
    L = sg.from_recipe(PLACEHOLDER, replica, W8, rec, version="0.5.19")
    # hand: reserve 512 + 2048*1.5 + 1024 + 80*2 + 1536 = 6304 MiB of 24576 -> 0.743; P = 24 - 0.5 - 0.5 = 23 GiB
    static = 0.743 * 23.0
    off = math.ceil(W8 - static + KV_345B * 8192 / GIB)
    assert off == 6
    assert L.argv == ["python3", "-m", "sglang.launch_server", "--model-path", PLACEHOLDER, "--tp-size", "8",
                      "--ep-size", "8", "--dtype", "float16", "--mem-fraction-static", "0.743",
                      "--context-length", "8192", "--cpu-offload-gb", "6", "--disable-custom-all-reduce",
                      "--host", "127.0.0.1", "--port", "30000"]
    assert L.env == {"NCCL_P2P_DISABLE": "1"}
    m = L.memory
    assert m.fits and m.kv_bytes_per_token == KV_345B
    assert m.kv_pool_gib == pytest.approx(static - (W8 - 6), abs=1e-3)
    assert m.max_total_tokens == int((static - (W8 - 6)) * GIB // KV_345B)
    assert L.attention_backend is None  # DSA is SGLang's own choice, and sm86 has none: the warning says so
    assert any("need sm90+" in w and "Dense fallback" in w for w in L.warnings)


def test_345b_8xa100_golden(replica):
    rec = recipes.load("deepseek-v3.2-reap-345b-w3a16-8xa100-40g")
    L = sg.from_recipe(PLACEHOLDER, replica, W8, rec, version="0.5.19")
    # hand: reserve 512 + 4096*1.5 + 1024 + 160*2 + 1536 = 9536 MiB of 40960 -> 0.767; P = 39 GiB
    kv_gib = 0.767 * 39.0 - W8
    assert L.argv == ["python3", "-m", "sglang.launch_server", "--model-path", PLACEHOLDER, "--tp-size", "8",
                      "--ep-size", "8", "--dtype", "float16", "--mem-fraction-static", "0.767",
                      "--context-length", "65536", "--host", "127.0.0.1", "--port", "30000"]
    assert L.memory.kv_pool_gib == pytest.approx(kv_gib, abs=1e-3)
    assert L.memory.max_total_tokens == int(kv_gib * GIB // KV_345B) > 65536
    assert L.memory.cpu_offload_gb == 0 and L.env == {}


def test_345b_h200_leaves_dsa_to_sglang_and_warns_about_fp16(replica):
    L = sg.sglang_command(PLACEHOLDER, replica, W8, planner.Gpu(8, 140.0, "9.0", "NVIDIA H200"), version="0.5.23",
                          context_length=32768, port=8000, extra_args=["--attention-backend", "triton", "--x"])
    assert L.argv[L.argv.index("--port"):] == ["--port", "8000", "--attention-backend", "triton", "--x"]
    assert "--attention-backend" not in L.argv[:L.argv.index("--port")]
    assert "--disable-custom-all-reduce" not in L.argv
    assert any("pairing is unverified" in w for w in L.warnings)


def test_tiny_golden_sm90_and_sm86(tiny):
    _, dst = tiny
    h100 = planner.Gpu(1, 80.0, "9.0", "NVIDIA H100 80GB HBM3")
    L = sg.sglang_command("/m/tiny", dst, 0.1, h100, version="0.5.19", context_length=2048)
    # hand: reserve max(512 + 8192*1.5 + 128 + 256*2 + 1536, 10240) = 14976 MiB of 81920 -> 0.817
    assert L.argv == ["python3", "-m", "sglang.launch_server", "--model-path", "/m/tiny", "--tp-size", "1",
                      "--dtype", "float16", "--attention-backend", "fa3", "--mem-fraction-static", "0.817",
                      "--context-length", "2048", "--host", "127.0.0.1", "--port", "30000"]
    assert L.memory.kv_bytes_per_token == 576 * 2 * 2  # 2 layers, no indexer
    assert L.memory.kv_pool_gib == pytest.approx(0.817 * 79.5 - 0.1, abs=1e-3)
    a6000 = planner.Gpu(2, 48.0, "8.6", "NVIDIA RTX A6000")
    L2 = sg.sglang_command("/m/tiny", dst, 0.1, a6000, version="0.5.19", context_length=4096, port=8011,
                           consumer_pcie=False, extra_args=["--disable-cuda-graph"])
    # hand: reserve 512 + 4096*1.5 + 256 + 32*2 + 1536 = 8512 MiB of 49152 -> 0.827
    assert L2.argv == ["python3", "-m", "sglang.launch_server", "--model-path", "/m/tiny", "--tp-size", "2",
                       "--ep-size", "2", "--dtype", "float16", "--attention-backend", "triton",
                       "--mem-fraction-static", "0.827", "--context-length", "4096", "--host", "127.0.0.1",
                       "--port", "8011", "--disable-cuda-graph"]


def test_tiny_auto_context_is_capped_by_the_model(tiny):
    _, dst = tiny
    L = sg.sglang_command("/m", dst, 0.1, planner.Gpu(1, 24.0, "8.6"), version="0.5.19")
    assert L.memory.context_length == 4096  # TinySpec's max_position_embeddings; the pool holds far more
    assert L.memory.max_total_tokens > 1_000_000


def test_memory_rule_by_hand():
    g = planner.Gpu(4, 24.0, "8.6")
    m = sg.memory(20.0, 70_272, g, 4, mem_fraction_static=0.9, context_length=8192, cpu_offload_gb=0)
    assert m.pre_load_gib == 23.0 and m.static_gib == pytest.approx(20.7) and m.slack_gib == pytest.approx(2.3)
    assert m.kv_pool_gib == pytest.approx(0.7)
    assert m.max_total_tokens == int(0.7 * GIB // 70_272) == 10695
    assert m.fits
    short = sg.memory(20.0, 70_272, g, 4, mem_fraction_static=0.9, context_length=16384, cpu_offload_gb=0)
    assert not short.fits and "fewer than --context-length 16384" in short.reason
    auto = sg.memory(20.0, 70_272, g, 4, mem_fraction_static=0.9, context_length=16384, cpu_offload_gb=None)
    assert auto.cpu_offload_gb == 1 and auto.fits  # 20 - 20.7 + 16384*70272/2^30 = 0.372 -> 1 GiB
    over = sg.memory(30.0, 70_272, g, 4, mem_fraction_static=0.9, cpu_offload_gb=0)
    assert not over.fits and "exceed the static budget" in over.reason
    # 19968/24576 = 0.8125, Python rounds half to even as SGLang does
    assert sg.default_fraction(24.0, 8) == 0.743 and sg.default_fraction(24.0, 8, cuda_graph=False) == 0.812


def test_script_is_valid_bash_and_checks_version(replica, tmp_path):
    rec = recipes.load("deepseek-v3.2-reap-345b-w3a16-8x3090")
    s = sg.from_recipe(PLACEHOLDER, replica, W8, rec, version="0.5.19").script(rec)
    p = tmp_path / "serve.sh"
    p.write_text(s)
    assert subprocess.run(["bash", "-n", str(p)]).returncode == 0
    assert "MIN_SGLANG=0.5.10" in s and "export NCCL_P2P_DISABLE=1" in s
    assert s.rstrip().endswith("--port 30000")
    assert 'exec "$PYTHON" -m sglang.launch_server \\\n  --model-path "$MODEL" \\\n  --tp-size 8 \\' in s
    assert "# why: float16:" in s and "# warning: --cpu-offload-gb 6:" in s


def test_script_preflight_refuses_old_sglang(tiny, tmp_path):
    _, dst = tiny
    s = sg.sglang_command("/m", dst, 0.1, planner.Gpu(1, 24.0, "8.6"), version="0.5.19").script()
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\necho 24576\n")
    (bin_ / "python3").write_text('#!/bin/sh\necho "$*" | grep -q importlib && { echo 0.5.9; exit 0; }\nexit 9\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    p = tmp_path / "serve.sh"
    p.write_text(s)
    r = subprocess.run(["bash", str(p)], capture_output=True, text=True, env={"PATH": f"{bin_}:/usr/bin:/bin"})
    assert r.returncode == 1 and "SGLang 0.5.9 is older than 0.5.10" in r.stderr


def test_versions():
    assert sg.check_version("0.5.19") == "0.5.19"
    assert sg.check_version("0.5.10.post1") == "0.5.10.post1"
    assert sg.check_version("0.6.0rc1") == "0.6.0rc1"
    with pytest.raises(UserError, match="older than 0.5.10"):
        sg.check_version("0.5.9")
    with pytest.raises(UserError, match="expected a version"):
        sg.check_version("latest")


def test_refuses_3bit_source_and_quantized_kv_b(tiny, replica, tmp_path):
    src, _ = tiny
    with pytest.raises(UserError, match=r"modules at 3 bits; SGLang cannot load them.*w3repack convert"):
        sg.sglang_command("/m", src, 0.1, planner.Gpu(1, 24.0, "8.6"), version="0.5.19")
    m = planner.Model(replica.root, replica.config, [t for t in replica.tensors if "kv_b_proj" not in t[0]]
                      + [("model.layers.0.self_attn.kv_b_proj.qweight", "I32", (64, 32768), 0),
                         ("model.layers.0.self_attn.kv_b_proj.qzeros", "I32", (4, 4096), 0),
                         ("model.layers.0.self_attn.kv_b_proj.scales", "F16", (4, 32768), 0)])
    with pytest.raises(UserError, match="1 quantized kv_b_proj modules; SGLang's DeepSeek loader dequantizes them as AWQ"):
        sg.check_model(m)



def test_reserve_warning_only_above_sglangs_default(tiny):
    """SGLang's default fraction leaves its own reserve by definition (it is computed from it); before, the launcher
    compared that reserve with the slack of a smaller pre-load figure and warned on every default launch."""
    _, dst = tiny
    h100 = planner.Gpu(1, 80.0, "9.0", "NVIDIA H100 80GB HBM3")
    L = sg.sglang_command("/m", dst, 0.1, h100, version="0.5.19", context_length=2048)
    assert L.memory.mem_fraction_static == 0.817 and not any("for activations and CUDA graphs" in w for w in L.warnings)
    L = sg.sglang_command("/m", dst, 0.1, h100, version="0.5.19", context_length=2048, mem_fraction_static=0.9)
    assert any(w.startswith("--mem-fraction-static 0.9 leaves 7.95 GiB for activations and CUDA graphs; SGLang's own "
                            "estimate is 14.62 GiB (its default here: 0.817)") for w in L.warnings), L.warnings

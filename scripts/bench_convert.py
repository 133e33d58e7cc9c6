#!/usr/bin/env python3
"""Benchmark convert/verify against cp and plain reads of the same bytes, in one run.

Generates DeepSeek-shaped 3-bit checkpoints (hidden 7168, expert intermediate 2048, random words are
valid 3-bit codes, bf16 float tensors) of the given sizes, then times, per size:
``cp -r SRC && sync`` (convert fsyncs its output, so the copy is made durable too), ``w3repack convert``, ``w3repack verify`` and reading both trees (``cat > /dev/null``),
dropping the page cache before each step when permitted (root), and reports MB/s of source bytes,
ratios, and the peak resident memory of each process (``wait4`` rusage).

    python scripts/bench_convert.py --sizes 0.5 1 2 --dir /tmp/w3bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from repack import codec  # noqa: E402
from repack.safetensors_io import build_header  # noqa: E402

H, M, G = 7168, 2048, 128


def _expert_tensors(prefix: str, rng: np.random.Generator):
    for name, n, k in (("gate_proj", M, H), ("up_proj", M, H), ("down_proj", H, M)):
        p = f"{prefix}.{name}"
        yield f"{p}.qweight", "I32", (k * 3 // 32, n), lambda s, r=rng: r.integers(0, 2**32, size=s, dtype=np.uint32)
        yield f"{p}.qzeros", "I32", (k // G, n * 3 // 32), lambda s, g=k // G, n=n: codec.sym_qzeros(g, n, 3)
        yield f"{p}.scales", "F16", (k // G, n), lambda s, r=rng: (r.standard_normal(s) * 0.01).astype(np.float16)


def generate(root: Path, gbytes: float, shard_bytes: int, seed: int = 0) -> int:
    """Write a checkpoint of about ``gbytes`` GB; ~8% bf16 float tensors, the rest 3-bit experts."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    target = int(gbytes * 1e9)
    items, total, layer, e = [], 0, 0, 0
    float_every = 12
    while total < target:
        if len(items) % float_every == 0:
            name = f"model.layers.{layer}.float_block_{e}.weight"
            items.append((name, "BF16", (1024, H), lambda s, r=rng: r.integers(0, 2**16, size=s, dtype=np.uint16)))
            total += 1024 * H * 2
        for t in _expert_tensors(f"model.layers.{layer}.mlp.experts.{e}", rng):
            items.append(t)
            total += int(np.prod(t[2])) * (2 if t[1] == "F16" else 4)
        e += 1
        if e == 64:
            layer, e = layer + 1, 0
    shards, cur, size = [], [], 0
    for it in items:
        nb = int(np.prod(it[2])) * (2 if it[1] in ("F16", "BF16") else 4)
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += nb
    shards.append(cur)
    wm = {}
    for i, sh in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        prefix, _ = build_header([(n, d, s) for n, d, s, _ in sh], {"format": "pt"})
        with open(root / name, "wb") as f:
            f.write(prefix)
            for n, d, s, make in sh:
                f.write(np.ascontiguousarray(make(s)).tobytes())
                wm[n] = name
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    qc = {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", "bits": 3, "group_size": G,
          "sym": True, "data_type": "int"}
    (root / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                                                  "quantization_config": qc}))
    return sum(p.stat().st_size for p in root.glob("*.safetensors"))


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str], cold: bool) -> tuple[float, float]:
    """Run ``cmd``; return (seconds, peak RSS MiB of the process)."""
    if cold:
        drop_caches()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return dt, ru.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="GB of source shards")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/w3repack-bench"))
    ap.add_argument("--shard-mb", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2 * (os.cpu_count() or 1))
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache between steps")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    cold = not args.warm and drop_caches()
    w3 = [sys.executable, "-m", "repack"]
    rows = []
    for gb in args.sizes:
        base = args.dir / f"{gb:g}GB"
        shutil.rmtree(base, ignore_errors=True)
        src, dst, cpd = base / "src", base / "dst", base / "cp"
        nbytes = generate(src, gb, args.shard_mb << 20)
        out_bytes = None
        r = {"size_gb": gb, "source_bytes": nbytes}
        r["cp_s"], r["cp_rss"] = timed(["sh", "-c", f"cp -r {src} {cpd} && sync"], cold)
        shutil.rmtree(cpd)
        r["convert_s"], r["convert_rss"] = timed(w3 + ["convert", str(src), str(dst), "--workers", str(args.workers)], cold)
        out_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
        r["output_bytes"] = out_bytes
        r["read_both_s"], _ = timed(["sh", "-c", f"cat {src}/*.safetensors {dst}/*.safetensors > /dev/null"], cold)
        r["verify_s"], r["verify_rss"] = timed(w3 + ["verify", str(src), str(dst), "--workers", str(args.workers)], cold)
        rows.append(r)
        if not args.keep:
            shutil.rmtree(base)
    cores = os.cpu_count()
    print(f"\nmachine: {cores} cores, page cache {'dropped before each step' if cold else 'warm'}, workers {args.workers}\n")
    hdr = f"{'size':>6} {'cp s':>7} {'convert s':>9} {'conv MB/s':>9} {'conv/cp':>7} {'read both s':>11} {'verify s':>8} {'ver MB/s':>8} {'ver/read':>8} {'conv RSS':>8} {'ver RSS':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        mb = r["source_bytes"] / 1e6
        print(f"{r['size_gb']:>5g}G {r['cp_s']:>7.2f} {r['convert_s']:>9.2f} {mb / r['convert_s']:>9.0f} "
              f"{r['convert_s'] / r['cp_s']:>7.2f} {r['read_both_s']:>11.2f} {r['verify_s']:>8.2f} {mb / r['verify_s']:>8.0f} "
              f"{r['verify_s'] / r['read_both_s']:>8.2f} {r['convert_rss']:>6.0f}Mi {r['verify_rss']:>6.0f}Mi")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        f = b["source_bytes"] / a["source_bytes"]
        print(f"\nscaling {a['size_gb']:g}G -> {b['size_gb']:g}G (x{f:.2f} bytes): convert x{b['convert_s'] / a['convert_s']:.2f}, "
              f"verify x{b['verify_s'] / a['verify_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

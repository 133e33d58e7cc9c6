#!/usr/bin/env python3
"""Benchmark convert/verify against cp and plain reads of the same bytes, in one run.

Generates DeepSeek-shaped 3-bit checkpoints (hidden 7168, expert intermediate 2048, random words are
valid 3-bit codes, ~8% bf16 float tensors) of the given sizes, then, per size and repeat, times
``cp -r SRC && sync`` (convert fsyncs its output, so the copy is made durable too), ``w3repack convert``,
reading both trees (``cat > /dev/null``) and ``w3repack verify``, dropping the page cache before each step
when permitted (root). Reports medians: MB/s of source bytes, ratios against the baselines, CPU seconds
per GB, and the peak resident memory of each process (``wait4`` rusage). Also measures the codec alone
(one core), the fixed cost of a run (a 10 MB checkpoint), and a single-shard checkpoint (memory must not
grow with shard size), and projects the time
for a model of ``--project-gb`` from the measured CPU cost and assumed disk rates.

    python scripts/bench_convert.py --sizes 0.5 1 2 --single-shard-gb 2 --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
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
    items: list = []
    total, layer, e = 0, 0, 0
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
    shards: list = []
    cur: list = []
    size = 0
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
            for n, _d, s, make in sh:
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


_TIME = shutil.which("time")
GNU_TIME = Path(_TIME).resolve() if _TIME else None


def timed(cmd: list[str], cold: bool) -> dict:
    """Run ``cmd``; return wall seconds, CPU seconds (user+sys) and peak RSS (MiB) of the process tree.

    The command runs under GNU time when it is installed: a child forked straight from this (large)
    Python process would report this process's peak RSS as its own.
    """
    if cold:
        drop_caches()
    stats = args_file = None
    if GNU_TIME:
        args_file = Path(f"/tmp/w3bench-time-{os.getpid()}")
        cmd = [str(GNU_TIME), "-f", "%U %S %M", "-o", str(args_file)] + cmd
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    if args_file is not None:
        u, s_, m = args_file.read_text().split()[-3:]
        args_file.unlink()
        stats = {"cpu": float(u) + float(s_), "rss": int(m) / 1024}
    else:
        stats = {"cpu": ru.ru_utime + ru.ru_stime, "rss": ru.ru_maxrss / 1024}
    return {"s": dt, **stats}


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def bench_codec(mib: int = 64, reps: int = 5) -> dict:
    """Single-core MiB/s of 3-bit input: transcode to 4-bit (convert), back (verify), and sha256."""
    rng = np.random.default_rng(1)
    rows = (mib << 20) // (4 * M) // 3 * 3
    w3 = rng.integers(0, 2**32, size=(rows, M), dtype=np.uint32).view(np.int32)
    out = np.empty(w3.nbytes * 4 // 3, dtype=np.uint8)
    w4 = codec.transcode_to4(w3, 3).copy()
    res = {}

    def best(fn) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return w3.nbytes / 2**20 / min(ts)

    res["to4_mb_s"] = best(lambda: codec.transcode_to4(w3, 3, out=out))
    res["from4_mb_s"] = best(lambda: codec.transcode_from4(w4, 3))
    res["sha256_mb_s"] = best(lambda: hashlib.sha256(w3.data).digest())
    chunk = w3[: (4 << 20) // (4 * M) // 3 * 3]
    n = (w3.shape[0] // chunk.shape[0])
    res["to4_chunked_mb_s"] = best(lambda: [codec.transcode_to4(chunk, 3, out=out) for _ in range(n)]) * (n * chunk.nbytes) / w3.nbytes
    return res


def bench_fixed(base: Path, repeat: int, cold: bool, w3: list[str]) -> dict:
    """The fixed cost of a run (interpreter, imports, plan, manifest): ``convert`` of a ~10 MB checkpoint."""
    shutil.rmtree(base, ignore_errors=True)
    src, dst = base / "src", base / "dst"
    generate(src, 0.01, 256 << 20)
    runs = []
    for _ in range(repeat):
        shutil.rmtree(dst, ignore_errors=True)
        runs.append(timed(w3 + ["convert", str(src), str(dst)], cold))
    shutil.rmtree(base)
    return median_of(runs)


def run_size(label: str, base: Path, gb: float, shard_mb: int, workers: int, repeat: int, cold: bool, w3: list[str]) -> dict:
    shutil.rmtree(base, ignore_errors=True)
    src, dst, cpd = base / "src", base / "dst", base / "cp"
    nbytes = generate(src, gb, shard_mb << 20)
    steps: dict[str, list[dict]] = {k: [] for k in ("cp", "convert", "read_both", "verify", "convert_nohash", "verify_nohash")}
    wk = ["--workers", str(workers)]
    for _ in range(repeat):
        steps["cp"].append(timed(["sh", "-c", f"cp -r {src} {cpd} && sync"], cold))
        shutil.rmtree(cpd)
        shutil.rmtree(dst, ignore_errors=True)
        steps["convert_nohash"].append(timed(w3 + ["convert", str(src), str(dst), "--no-hash"] + wk, cold))
        steps["verify_nohash"].append(timed(w3 + ["verify", str(src), str(dst)] + wk, cold))
        shutil.rmtree(dst)
        steps["convert"].append(timed(w3 + ["convert", str(src), str(dst)] + wk, cold))
        steps["read_both"].append(timed(["sh", "-c", f"cat {src}/*.safetensors {dst}/*.safetensors > /dev/null"], cold))
        steps["verify"].append(timed(w3 + ["verify", str(src), str(dst)] + wk, cold))
    out_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    shards = len(list(src.glob("*.safetensors")))
    shutil.rmtree(base)
    r = {"label": label, "size_gb": gb, "shards": shards, "source_bytes": nbytes, "output_bytes": out_bytes}
    for k, runs in steps.items():
        m = median_of(runs)
        r[f"{k}_s"], r[f"{k}_cpu_s"], r[f"{k}_rss_mib"] = m["s"], m["cpu"], m["rss"]
        r[f"{k}_s_all"] = [round(x["s"], 3) for x in runs]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="GB of source shards")
    ap.add_argument("--single-shard-gb", type=float, default=2.0, help="also a checkpoint that is one shard of this size (0: skip)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/w3repack-bench"))
    ap.add_argument("--shard-mb", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3, help="runs per step; the table shows medians")
    ap.add_argument("--workers", type=int, default=None, help="default: the tool's own default for this machine")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache between steps")
    ap.add_argument("--project-gb", type=float, default=138.0, help="source size to project the time for")
    ap.add_argument("--project-cores", type=int, default=16)
    ap.add_argument("--project-read-gbs", type=float, default=3.0, help="assumed sequential read GB/s of the target disk")
    ap.add_argument("--project-write-gbs", type=float, default=2.0, help="assumed sustained write GB/s of the target disk")
    ap.add_argument("--json", type=Path, help="also write all results as JSON here")
    args = ap.parse_args()
    from repack.run import default_workers

    workers = args.workers or default_workers()
    cold = not args.warm and drop_caches()
    w3 = [sys.executable, "-m", "repack"]

    codec_res = bench_codec()
    fixed = bench_fixed(args.dir / "tiny", args.repeat, cold, w3)
    rows = [run_size(f"{gb * 1e9 / 2**30:.2f} GiB", args.dir / f"{gb:g}GB", gb, args.shard_mb, workers, args.repeat, cold, w3) for gb in args.sizes]
    if args.single_shard_gb:
        gb = args.single_shard_gb
        rows.append(run_size(f"{gb * 1e9 / 2**30:.2f} GiB, 1 shard", args.dir / "single", gb, int(gb * 1000) + 64, workers, args.repeat, cold, w3))

    cores = os.cpu_count()
    load = os.getloadavg()
    disk = subprocess.run(["df", "--output=source,fstype", str(args.dir)], capture_output=True, text=True).stdout.split()[-2:]
    print(f"\nload average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min); "
          f"disk of {args.dir}: {' '.join(disk)}")
    print("\nmarkdown rows (checkpoint | shards | cp -r + sync | convert | convert / cp | --no-hash / cp | cat both | verify | verify / cat | peak RSS):")
    for r in rows:
        print(f"| {r['label']} | {r['shards']} | {r['cp_s']:.2f} s | {r['convert_s']:.2f} s | {r['convert_s'] / r['cp_s']:.2f} | "
              f"{r['convert_nohash_s'] / r['cp_s']:.2f} | {r['read_both_s']:.2f} s | {r['verify_s']:.2f} s | "
              f"{r['verify_s'] / r['read_both_s']:.2f} | {max(r['convert_rss_mib'], r['verify_rss_mib']):.0f} MiB |"
              f"  all convert runs: {r['convert_s_all']}, cp: {r['cp_s_all']}")
    ram_gib = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
    print(f"\nmachine: {platform.processor() or platform.machine()}, {cores} cores, {ram_gib:.0f} GiB RAM; "
          f"page cache {'dropped before each step' if cold else 'warm'}; workers {workers}; medians of {args.repeat} runs\n")
    print("codec alone, one core, MiB/s of 3-bit input:")
    print(f"  3->4 transcode {codec_res['to4_mb_s']:8.0f}   (4 MiB chunks as convert feeds it: {codec_res['to4_chunked_mb_s']:.0f})")
    print(f"  4->3 transcode {codec_res['from4_mb_s']:8.0f}   (verify)")
    print(f"  sha256         {codec_res['sha256_mb_s']:8.0f}   (convert hashes source and output)\n")
    print(f"fixed cost of one convert run (interpreter, imports, plan, manifest; a 10 MB checkpoint): {fixed['s']:.2f} s, "
          f"{fixed['cpu']:.2f} CPU-s\n")
    hdr = (f"{'checkpoint':<16} {'shards':>6} {'cp s':>6} {'convert s':>9} {'MiB/s':>5} {'/cp':>5} {'--no-hash s':>11} {'/cp':>5} "
           f"{'read both s':>11} {'verify s':>8} {'MiB/s':>5} {'/read':>5} {'(no-hash) s':>11} {'/read':>5} "
           f"{'conv RSS':>8} {'ver RSS':>8} {'cp RSS':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        mb = r["source_bytes"] / 2**20
        print(f"{r['label']:<16} {r['shards']:>6} {r['cp_s']:>6.2f} {r['convert_s']:>9.2f} {mb / r['convert_s']:>5.0f} "
              f"{r['convert_s'] / r['cp_s']:>5.2f} {r['convert_nohash_s']:>11.2f} {r['convert_nohash_s'] / r['cp_s']:>5.2f} "
              f"{r['read_both_s']:>11.2f} {r['verify_s']:>8.2f} {mb / r['verify_s']:>5.0f} {r['verify_s'] / r['read_both_s']:>5.2f} "
              f"{r['verify_nohash_s']:>11.2f} {r['verify_nohash_s'] / r['read_both_s']:>5.2f} "
              f"{max(r['convert_rss_mib'], r['convert_nohash_rss_mib']):>5.0f}MiB {max(r['verify_rss_mib'], r['verify_nohash_rss_mib']):>5.0f}MiB "
              f"{r['cp_rss_mib']:>3.0f}MiB")
    multi = [r for r in rows if "shard," not in r["label"]]
    if len(multi) > 1:
        print("\nscaling (time ratio / size ratio; 1.00 is linear):")
        for a, b in zip(multi, multi[1:]):
            f = b["source_bytes"] / a["source_bytes"]
            print(f"  {a['label']} -> {b['label']}: convert {b['convert_s'] / a['convert_s'] / f:.2f}, "
                  f"--no-hash {b['convert_nohash_s'] / a['convert_nohash_s'] / f:.2f}, verify {b['verify_s'] / a['verify_s'] / f:.2f}, "
                  f"cp {b['cp_s'] / a['cp_s'] / f:.2f}")

    big = max(multi, key=lambda r: r["source_bytes"])
    gbs = big["source_bytes"] / 1e9
    conv_cpu, ver_cpu = big["convert_cpu_s"] / gbs, big["verify_cpu_s"] / gbs
    nh_cpu = big["convert_nohash_cpu_s"] / gbs
    growth = big["output_bytes"] / big["source_bytes"]
    n, pc = args.project_gb, args.project_cores
    cpu_conv, cpu_ver = n * conv_cpu / pc, n * ver_cpu / pc
    disk_conv = n / args.project_read_gbs + n * growth / args.project_write_gbs  # not overlapped: conservative
    disk_ver = n * (1 + growth) / args.project_read_gbs
    print(f"\nCPU cost measured here: convert {conv_cpu:.2f} CPU-s per GB of source (--no-hash {nh_cpu:.2f}), "
          f"verify {ver_cpu:.2f}; output/source {growth:.3f}")
    print(f"projection, {n:g} GB source on {pc} cores, disk assumed {args.project_read_gbs:g} GB/s read / {args.project_write_gbs:g} GB/s write "
          "(disk time = read + write, not overlapped; CPU time = measured CPU-s/GB spread over the cores):")
    print(f"  convert: CPU {cpu_conv / 60:.1f} min, disk {disk_conv / 60:.1f} min -> about {max(cpu_conv, disk_conv) / 60:.1f} min")
    print(f"  verify:  CPU {cpu_ver / 60:.1f} min, disk {disk_ver / 60:.1f} min -> about {max(cpu_ver, disk_ver) / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps({"codec": codec_res, "fixed": fixed, "rows": rows, "workers": workers, "cold": cold}, indent=2))


if __name__ == "__main__":
    main()

"""Run on the GPU host: stage this folder's part; once every part is staged, check and extract into /tmp/sgsite.

Layout: ``BUNDLE`` holds ``<number of parts> <sha256 of site.tar.xz>``; ``part.<k>`` are its pieces in order.
Prints ``ready`` when /tmp/sgsite holds the whole tree, else how many parts are still missing. ``PYTHONPATH`` does
not read ``.pth`` files, so the path lines of the tree's root ``*.pth`` (nvidia-cutlass-dsl's puts ``cutlass`` under
``nvidia_cutlass_dsl/python_packages``) go after /tmp/sgsite in ``/tmp/sgsite/PYTHONPATH``, printed as an export.
"""
import glob
import hashlib
import lzma
import os
import shutil
import tarfile

here = os.path.dirname(os.path.abspath(__file__))
stage, site = "/tmp/sgparts", "/tmp/sgsite"
os.makedirs(stage, exist_ok=True)
with open(os.path.join(here, "BUNDLE")) as f:
    count, sha = f.read().split()
for part in glob.glob(os.path.join(here, "part.*")):
    shutil.copy(part, stage)
have = sorted(glob.glob(os.path.join(stage, "part.*")), key=lambda p: int(p.rsplit(".", 1)[1]))
if len(have) < int(count):
    print(f"staged {len(have)} of {count} parts")
else:
    digest = hashlib.sha256()
    whole = os.path.join(stage, "site.tar.xz")
    with open(whole, "wb") as out:
        for p in have:
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha:
        raise SystemExit(f"error: {whole}: sha256 {digest.hexdigest()} is not the bundle's {sha}")
    with lzma.open(whole) as f:
        tarfile.open(fileobj=f).extractall(site)
    paths = [site]
    for pth in sorted(glob.glob(os.path.join(site, "*.pth"))):
        with open(pth) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith(("#", "import"))]
        paths += [os.path.join(site, ln) for ln in lines if os.path.isdir(os.path.join(site, ln))]
    with open(os.path.join(site, "PYTHONPATH"), "w") as f:
        f.write(os.pathsep.join(paths) + "\n")
    print("ready", site)
    print("export PYTHONPATH=" + os.pathsep.join(paths) + '${PYTHONPATH:+:$PYTHONPATH}')

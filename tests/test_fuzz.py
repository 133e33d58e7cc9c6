"""Fuzzed headers and JSON: the CLI either refuses with one ``error:`` line (exit 2) or converts an output
that ``verify`` accepts. Nothing else: no traceback, no unforeseen exception, no other exit code."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repack import synth
from tests.helpers import tree_hashes
from tests.helpers import w3repack_in_process as run_cli

JSON_FILES = ("config.json", "quantization_config.json", "model.safetensors.index.json")

json_values = st.recursive(
    st.none() | st.booleans() | st.sampled_from([0, -1, 1, 2, 3, 4, 5, 8, 16, 32, 64, 128, 2**63])
    | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    spec = synth.TinySpec.small(traps=True, extra_files={"tokenizer_config.json": "{}\n"})
    return synth.write_checkpoint(tmp_path_factory.mktemp("fuzz") / "src", spec)


def paths(obj, prefix=()):
    """Every key path in a JSON tree (dict keys and list indices)."""
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from paths(v, prefix + (k,))


def shards(root: Path) -> list[Path]:
    return sorted(root.glob("*.safetensors"))


@st.composite
def header_mutation(draw, root: Path):
    shard = draw(st.sampled_from(shards(root)))
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "entry"]))
    if kind == "flip":
        pos = draw(st.integers(0, 8 + n - 1))
        bit = draw(st.sampled_from([0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF]))
        return ("flip", shard.name, pos, bit)
    if kind == "truncate":
        return ("truncate", shard.name, draw(st.integers(0, 8 + n + 64)))
    header = json.loads(raw[8 : 8 + n])
    name = draw(st.sampled_from(sorted(header)))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
    value = draw(st.sampled_from(["I32", "F16", "BF16", "F32", "I64", "U8", "X"]) if field == "dtype" else json_values)
    return ("entry", shard.name, name, field, value)


@st.composite
def json_mutation(draw, root: Path):
    fname = draw(st.sampled_from(JSON_FILES))
    text = (root / fname).read_text()
    if draw(st.integers(0, 9)) == 0:
        return ("cut", fname, draw(st.integers(0, len(text))))
    obj = json.loads(text)
    all_paths = list(paths(obj))
    if fname.endswith("index.json"):
        wm = [p for p in all_paths if len(p) == 2 and p[0] == "weight_map"]
        all_paths = [p for p in all_paths if p not in wm] + draw(st.lists(st.sampled_from(wm), max_size=3))
    path = draw(st.sampled_from(all_paths))
    action = draw(st.sampled_from(["set", "set", "delete"]) if path else st.just("set"))
    return ("json", fname, list(path), action, draw(json_values) if action == "set" else None)


def apply(root: Path, m: tuple) -> None:
    kind = m[0]
    if kind == "flip":
        _, name, pos, bit = m
        raw = bytearray((root / name).read_bytes())
        raw[pos] ^= bit
        (root / name).write_bytes(bytes(raw))
    elif kind == "truncate":
        _, name, size = m
        (root / name).write_bytes((root / name).read_bytes()[:size])
    elif kind == "entry":
        _, name, tensor, field, value = m
        raw = (root / name).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        if field is None:
            header[tensor] = value
        elif isinstance(header[tensor], dict):
            header[tensor][field] = value
        h = json.dumps(header).encode()
        (root / name).write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])
    elif kind == "cut":
        _, fname, size = m
        (root / fname).write_text((root / fname).read_text()[:size])
    else:
        _, fname, path, action, value = m
        obj = json.loads((root / fname).read_text())
        if not path:
            obj = value
        else:
            parent = obj
            for k in path[:-1]:
                parent = parent[k]
            if action == "delete":
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        (root / fname).write_text(json.dumps(obj))


def check_outcome(src: Path, dst: Path) -> str:
    before = tree_hashes(src)
    code, out, err = run_cli("convert", src, dst, "--workers", "1")
    assert tree_hashes(src) == before, "the source was modified"
    if code == 0:
        vcode, vout, verr = run_cli("verify", src, dst)
        assert vcode == 0, (vout, verr)
        return "converted"
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "--debug" not in err, err
    assert not (dst / "config.json").exists() and not (dst / "w3repack.json").exists()
    return "refused"


FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(data=st.data())
def test_fuzzed_shard_headers(pristine, data):
    m = data.draw(header_mutation(pristine), label="mutation")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(shutil.copytree(pristine, Path(tmp) / "src"))
        apply(src, m)
        check_outcome(src, Path(tmp) / "dst")


@FUZZ
@given(data=st.data())
def test_fuzzed_index_and_config(pristine, data):
    m = data.draw(json_mutation(pristine), label="mutation")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(shutil.copytree(pristine, Path(tmp) / "src"))
        apply(src, m)
        check_outcome(src, Path(tmp) / "dst")


def test_run_cli_in_process_sees_real_outcomes(pristine, tmp_path):
    """The in-process runner reports both outcomes the fuzz tests accept."""
    src = Path(shutil.copytree(pristine, tmp_path / "src"))
    assert check_outcome(src, tmp_path / "ok") == "converted"
    apply(src, ("flip", shards(src)[0].name, 9, 0x40))
    assert check_outcome(src, tmp_path / "bad") == "refused"


# --- tampering with a finished DST: verify reports it (exit 1), or the mutation changed no byte --------------

UNPINNED = (("source", "path"),)  # where the source lay: verify may be given the same source under another path


@pytest.fixture(scope="module")
def finished(pristine, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("fuzz-dst") / "dst"
    code, _, err = run_cli("convert", pristine, dst, "--workers", "1")
    assert code == 0, err
    return dst


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _unpinned(path: tuple) -> bool:
    """Manifest values that record the conversion's environment, not its output: the source's path and times."""
    return path[:2] in UNPINNED or (len(path) == 4 and path[:2] == ("fingerprint", "source_files") and path[3] == 1)


@st.composite
def dst_mutation(draw, root: Path):
    files = _files(root)
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "append", "delete", "add", "link", "json", "json"]))
    if kind == "add":
        name = draw(st.sampled_from(["chat_template.jinja", "modeling_x.py", "pytorch_model.bin", ".x.safetensors",
                                     ".w3repack/state.json", "extra/new.txt", "sub/model.safetensors", ".hidden"]))
        return ("add", name, draw(st.binary(max_size=16)))
    name = draw(st.sampled_from(files))
    size = (root / name).stat().st_size
    if kind == "flip":
        pos = draw(st.integers(0, size - 1))
        return ("flip", name, pos, draw(st.sampled_from([0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF])))
    if kind == "truncate":
        return ("truncate", name, draw(st.integers(0, size - 1)))
    if kind == "append":
        return ("append", name, draw(st.binary(min_size=1, max_size=16)))
    if kind in ("delete", "link"):
        return (kind, name)
    jname = draw(st.sampled_from([f for f in files if f.endswith(".json")]))
    obj = json.loads((root / jname).read_text())
    all_paths = [p for p in paths(obj) if not (jname == "w3repack.json" and _unpinned(p))]
    path = draw(st.sampled_from(all_paths))
    action = draw(st.sampled_from(["set", "set", "delete"]) if path else st.just("set"))
    return ("json", jname, list(path), action, draw(json_values) if action == "set" else None)


def _in_unpinned_span(root: Path, name: str, pos: int) -> bool:
    """Whether byte ``pos`` of the manifest lies in the text of an unpinned value."""
    if name != "w3repack.json":
        return False
    text = (root / name).read_bytes()
    man = json.loads(text)
    spans = [json.dumps(man["source"]["path"])]
    spans += [str(v[1]) for v in man["fingerprint"].get("source_files", {}).values() if len(v) > 1]
    for s in spans:
        start = text.find(s.encode())
        while start != -1:
            if start <= pos < start + len(s.encode()):
                return True
            start = text.find(s.encode(), start + 1)
    return False


def tamper(root: Path, m: tuple) -> None:
    kind, name = m[0], m[1]
    p = root / name
    if kind == "flip":
        raw = bytearray(p.read_bytes())
        raw[m[2]] ^= m[3]
        p.write_bytes(bytes(raw))
    elif kind == "truncate":
        p.write_bytes(p.read_bytes()[: m[2]])
    elif kind == "append":
        p.write_bytes(p.read_bytes() + m[2])
    elif kind == "delete":
        p.unlink()
    elif kind == "add":
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            p.write_bytes(m[2])
    elif kind == "link":
        copy = root.parent / "elsewhere"
        copy.write_bytes(p.read_bytes())
        p.unlink()
        p.symlink_to(copy)
    else:
        apply(root, m)


@FUZZ
@given(data=st.data())
def test_any_tampering_with_a_finished_output_fails_verify(pristine, finished, data):
    m = data.draw(dst_mutation(finished), label="mutation")
    if m[0] == "flip" and _in_unpinned_span(finished, m[1], m[2]):
        return
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(shutil.copytree(finished, Path(tmp) / "dst", symlinks=True))
        before = {f: (dst / f).read_bytes() for f in _files(dst)}
        tamper(dst, m)
        after = {str(p.relative_to(dst)): p.read_bytes() for p in dst.rglob("*") if p.is_file() or p.is_symlink()}
        links = [p for p in dst.rglob("*") if p.is_symlink()]
        code, out, err = run_cli("verify", pristine, dst)
        if after == before and not links:
            assert code == 0, (out, err)
        else:
            assert code == 1, (m, code, out, err)
            assert "Traceback" not in err

"""Opt-in trace for ``scripts/gpu_check_sglang.py``: with ``W3REPACK_SGLANG_TRACE=<file>`` set and this folder first
on ``PYTHONPATH``, every SGLang process that loads a model appends one JSON line to that file: the quant-method
class (and MoE runner backend, where there is one) of each FusedMoE layer and of the attention's ``kv_b_proj`` /
``o_proj``, counted. The server's argv is untouched; without the variable nothing is patched."""

import os

if os.environ.get("W3REPACK_SGLANG_TRACE"):
    import importlib.abc
    import importlib.machinery
    import json
    import sys

    TARGET = "sglang.srt.model_executor.model_runner"

    def _record(model) -> None:
        counts: dict = {}
        for name, m in model.named_modules():
            qm = getattr(m, "quant_method", None)
            cls = type(m).__name__
            if qm is None or not ("MoE" in cls or "Experts" in cls or name.endswith(("kv_b_proj", "o_proj"))):
                continue
            desc = f"{cls}: {type(qm).__name__}"
            for attr in ("runner", "moe_runner_backend", "kernel_backend", "use_marlin"):
                v = getattr(qm, attr, None)
                if v is not None:
                    desc += f" {attr}={getattr(v, 'runner_backend', getattr(v, 'value', v))}"
            counts[desc] = counts.get(desc, 0) + 1
        with open(os.environ["W3REPACK_SGLANG_TRACE"], "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "modules": counts}) + "\n")

    def _patch(mod) -> None:
        cls = getattr(mod, "ModelRunner", None)
        if cls is None or getattr(cls, "_w3repack_traced", False):
            return
        orig = cls.load_model

        def load_model(self, *a, **k):
            out = orig(self, *a, **k)
            try:
                _record(self.model)
            except Exception as e:  # noqa: BLE001 - a trace must never stop the server
                with open(os.environ["W3REPACK_SGLANG_TRACE"], "a") as f:
                    f.write(json.dumps({"pid": os.getpid(), "error": repr(e)[:300]}) + "\n")
            return out

        cls.load_model, cls._w3repack_traced = load_model, True

    class _Loader(importlib.abc.Loader):
        def __init__(self, inner):
            self.inner = inner

        def create_module(self, spec):
            return self.inner.create_module(spec)

        def exec_module(self, module):
            self.inner.exec_module(module)
            _patch(module)

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != TARGET:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
            return spec

    sys.meta_path.insert(0, _Finder())

"""Bad input raises typed errors of the AdapterError family, with messages that say what and where."""

import pytest
import torch

from lorahub_engine import LoraAdapter, LoraModule
from lorahub_engine.errors import AdapterError, AdapterFileError, IncompatibleModelError, MergeError
from lorahub_engine.merge import merge


def adapter(name, out=8, inp=6, r=2, path="m", **fields):
    g = torch.Generator().manual_seed(len(name))
    return LoraAdapter(name, {path: LoraModule(torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), 1.0)},
                       **fields)


@pytest.mark.parametrize("args,kwargs,error,match", [
    (([],), {}, MergeError, "empty list"),
    ((adapter("a"),), {}, MergeError, "list of adapters"),
    (([adapter("a"), adapter("b")], [1.0]), {}, MergeError, "1 weights for 2 adapters"),
    (([adapter("a"), adapter("b")], [1.0, float("nan")]), {}, MergeError, r"weights\[1\] is nan"),
    (([adapter("a")], [float("inf")]), {}, MergeError, r"weights\[0\] is inf"),
    (([adapter("a")], ["x"]), {}, MergeError, "must be a number"),
    (([adapter("a")],), {"method": "slerp"}, MergeError, "unknown merge method 'slerp'; known: cat"),
    (([adapter("a")],), {"method": "ties", "density": 0}, MergeError, r"density must be in \(0, 1\]"),
    (([adapter("a")],), {"method": "ties", "density": 1.5}, MergeError, "density"),
    (([adapter("a")],), {"method": "cat", "density": 0.5}, MergeError, "'cat' does not take density"),
    (([adapter("a")],), {"method": "ties", "majority_sign_method": "mean"}, MergeError, "'total' or 'frequency'"),
    (([adapter("a")],), {"method": "knots", "knots_method": "svd"}, MergeError, "knots_method must be one of"),
    (([adapter("a")],), {"space": "weights"}, MergeError, "space must be one of"),
    (([adapter("a")],), {"method": "knots", "space": "factors"}, MergeError, "'knots' is defined in space 'delta'"),
    (([adapter("a")],), {"rank": 0}, MergeError, "rank must be None or a positive int"),
    (([adapter("a")],), {"rank": 2.5}, MergeError, "rank"),
    (([adapter("a")],), {"seed": "x"}, MergeError, "seed"),
    (([adapter("a"), 3],), {}, MergeError, "expected a LoraAdapter or a folder path, got int"),
    (([adapter("a", base_model="llama-7b"), adapter("b", base_model="mistral-7b")],), {}, IncompatibleModelError,
     "disagree on base_model .*'a': 'llama-7b', 'b': 'mistral-7b'"),
    (([adapter("a", fan_in_fan_out=True), adapter("b")],), {}, IncompatibleModelError, "fan_in_fan_out"),
    (([adapter("a", out=8), adapter("b", out=10)],), {}, IncompatibleModelError,
     r"module 'm' has different \[out, in\] shapes across adapters \('a': \[8, 6\], 'b': \[10, 6\]\)"),
    (([adapter("a", r=2), adapter("b", r=3)],), {"method": "ties", "space": "factors"}, MergeError,
     r"module 'm': space='factors' needs equal ranks, got \[2, 3\]"),
])
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        merge(*args, **kwargs)
    assert isinstance(info.value, AdapterError)


def test_missing_folder_is_a_file_error(tmp_path):
    with pytest.raises(AdapterFileError, match="no such adapter folder"):
        merge([adapter("a"), tmp_path / "nowhere"])


def test_base_models_agree_by_last_path_component():
    merged = merge([adapter("a", base_model="org/Llama-7b"), adapter("b"), adapter("c", base_model="/m/llama-7b")])
    assert merged.base_model == "org/Llama-7b"

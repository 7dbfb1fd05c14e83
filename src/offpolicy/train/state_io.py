"""Trainer state as safetensors + JSON: loading a checkpoint someone sent you never runs their code.

``torch.save`` pickles, and unpickling can call any function, so a crafted
checkpoint could run commands on ``--resume``. The trainer state is instead split
in two files that only ever hold data:

- ``state.safetensors``: every tensor (and every numpy array, as raw bytes), under
  a key made from its path in the state tree;
- ``state.json``: the rest of the tree. JSON has no tuples, no int keys and no
  NaN, and the state needs all three (``random.getstate()`` is a tuple, an
  optimizer's ``state`` is keyed by int, a metric can be NaN), so those are
  written as tagged objects ``{"@": tag, ...}``.

Supported: None, bool, int, float (NaN/inf too), str, list, tuple, dict (any of
those as keys; dict subclasses such as OrderedDict come back as dict), torch
tensors (come back on the CPU, detached), numpy arrays and scalars of numeric
dtype. Anything else is refused when saving, naming its path, so an unsupported
object is found by the first checkpoint, not by the first resume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from offpolicy.policy.model import CheckpointError

TAG = "@"
NUMPY_KINDS = "biufc"  # bool, int, uint, float, complex: never "O" (object arrays unpickle)


class _Unsupported(TypeError):
    pass


def _path(path: tuple) -> str:
    return "state" + "".join(f"[{p!r}]" for p in path)


def _encode(obj: Any, path: tuple, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON-ready form of ``obj``; tensors and arrays move into ``tensors``."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int) and not isinstance(obj, np.integer):
        return obj
    if isinstance(obj, float) and type(obj) is float:
        return obj if math.isfinite(obj) else {TAG: "float", "value": repr(obj)}
    if isinstance(obj, torch.Tensor):
        return {TAG: "tensor", "key": _store(tensors, path, obj.detach().cpu())}
    if isinstance(obj, (np.ndarray, np.generic)):
        return _encode_numpy(obj, path, tensors)
    if type(obj) is list:
        return [_encode(v, (*path, i), tensors) for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return {TAG: "tuple", "items": [_encode(v, (*path, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        return _encode_dict(obj, path, tensors)
    raise _Unsupported(f"{_path(path)}: cannot save a {type(obj).__module__}.{type(obj).__qualname__} "
                       f"(supported: None, bool, int, float, str, list, tuple, dict, tensor, numpy array)")


def _encode_dict(obj: dict, path: tuple, tensors: dict) -> Any:
    """A plain JSON object when every key is a str (readable); otherwise key/value pairs."""
    if all(type(k) is str for k in obj) and TAG not in obj:
        return {k: _encode(v, (*path, k), tensors) for k, v in obj.items()}
    return {TAG: "dict", "items": [[_encode(k, (*path, "<key>"), tensors), _encode(v, (*path, k), tensors)]
                                   for k, v in obj.items()]}


def _encode_numpy(obj: np.ndarray | np.generic, path: tuple, tensors: dict) -> Any:
    """Raw bytes + dtype + shape: torch lacks some numpy dtypes (``np.random`` state is uint32)."""
    arr = np.array(obj, order="C")  # a copy, 0-d kept (ascontiguousarray would make scalars 1-d)
    if arr.dtype.kind not in NUMPY_KINDS:
        raise _Unsupported(f"{_path(path)}: cannot save a numpy array of dtype {arr.dtype}")
    raw = torch.from_numpy(arr.reshape(-1).view(np.uint8).copy())
    return {TAG: "ndarray" if isinstance(obj, np.ndarray) else "npscalar", "key": _store(tensors, path, raw),
            "dtype": arr.dtype.str, "shape": list(arr.shape)}


def _store(tensors: dict, path: tuple, t: torch.Tensor) -> str:
    key = "/".join(map(str, path)) or "."
    while key in tensors:  # two paths can print alike ("1" the str, 1 the int)
        key += "'"
    tensors[key] = t.contiguous().clone()  # clone: safetensors refuses tensors that share storage
    return key


def save_state(state: dict, directory: Path, json_name: str, tensors_name: str) -> list[str]:
    """Write ``state`` as ``json_name`` + ``tensors_name`` in ``directory``; return the file names written."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        tree = _encode(state, (), tensors)
    except _Unsupported as e:
        raise TypeError(f"trainer state not saved: {e}") from None
    (directory / json_name).write_text(json.dumps({"format": "offpolicy-state", "version": 1, "tree": tree},
                                                  allow_nan=False))
    save_file(tensors, str(directory / tensors_name))
    return [json_name, tensors_name]


# ---- loading: data only, every tag checked ---------------------------------------------------
class _Bad(ValueError):
    pass


def _decode(node: Any, path: tuple, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, (*path, i), tensors, used) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        raise _Bad(f"{_path(path)}: unexpected {type(node).__name__}")
    if TAG not in node:
        return {k: _decode(v, (*path, k), tensors, used) for k, v in node.items()}
    tag = node[TAG]
    if tag == "tuple":
        return tuple(_decode(v, (*path, i), tensors, used) for i, v in enumerate(_field(node, "items", list, path)))
    if tag == "dict":
        return _decode_pairs(_field(node, "items", list, path), path, tensors, used)
    if tag == "float":
        value = _field(node, "value", str, path)
        if value not in ("nan", "inf", "-inf"):
            raise _Bad(f"{_path(path)}: bad float {value!r}")
        return float(value)
    if tag == "tensor":
        return _tensor(node, path, tensors, used)
    if tag in ("ndarray", "npscalar"):
        return _decode_numpy(node, path, tensors, used)
    raise _Bad(f"{_path(path)}: unknown tag {tag!r}")


def _decode_pairs(items: list, path: tuple, tensors: dict, used: set) -> dict:
    out = {}
    for pair in items:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _Bad(f"{_path(path)}: a dict item is not a [key, value] pair")
        key = _decode(pair[0], (*path, "<key>"), tensors, used)
        try:
            out[key] = _decode(pair[1], (*path, key), tensors, used)
        except TypeError:  # an unhashable key (a list)
            raise _Bad(f"{_path(path)}: unhashable key {key!r}") from None
    return out


def _field(node: dict, name: str, kind: type, path: tuple) -> Any:
    value = node.get(name)
    if not isinstance(value, kind):
        raise _Bad(f"{_path(path)}: {node[TAG]!r} needs a {kind.__name__} {name!r}")
    return value


def _tensor(node: dict, path: tuple, tensors: dict, used: set) -> torch.Tensor:
    key = _field(node, "key", str, path)
    if key not in tensors:
        raise _Bad(f"{_path(path)}: tensor {key!r} is missing")
    used.add(key)
    return tensors[key]


def _decode_numpy(node: dict, path: tuple, tensors: dict, used: set) -> np.ndarray | np.generic:
    try:
        dtype = np.dtype(_field(node, "dtype", str, path))
    except TypeError:
        raise _Bad(f"{_path(path)}: bad dtype {node['dtype']!r}") from None
    if dtype.kind not in NUMPY_KINDS:
        raise _Bad(f"{_path(path)}: numpy dtype {dtype} is not allowed")
    raw, shape = _tensor(node, path, tensors, used), _field(node, "shape", list, path)
    if raw.dtype != torch.uint8:
        raise _Bad(f"{_path(path)}: numpy bytes stored as {raw.dtype}, expected uint8")
    try:
        arr = np.frombuffer(raw.numpy().tobytes(), dtype=dtype).reshape(shape).copy()
    except (ValueError, TypeError) as e:
        raise _Bad(f"{_path(path)}: {e}") from None
    return arr if node[TAG] == "ndarray" else arr[()]


def load_state(directory: Path, json_name: str, tensors_name: str) -> dict:
    """The state written by :func:`save_state`. Never unpickles; a malformed file is a CheckpointError naming it."""
    json_file, tensors_file = directory / json_name, directory / tensors_name
    try:
        tensors = load_file(str(tensors_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{tensors_file}: not a readable safetensors file ({e})") from None
    try:
        doc = json.loads(json_file.read_text(), parse_constant=_no_constant)
        if not (isinstance(doc, dict) and doc.get("format") == "offpolicy-state" and doc.get("version") == 1):
            raise _Bad("not an offpolicy-state version 1 document")
        used: set[str] = set()
        state = _decode(doc["tree"], (), tensors, used)
    except (ValueError, OSError, RecursionError) as e:  # _Bad and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{json_file}: {e}") from None
    if set(tensors) - used:
        raise CheckpointError(f"{tensors_file}: holds tensors that {json_name} does not use: "
                              f"{sorted(set(tensors) - used)[:3]}")
    if not isinstance(state, dict):
        raise CheckpointError(f"{json_file}: the state is not a dict")
    return state


def _no_constant(name: str) -> Any:
    raise _Bad(f"bare {name} is not allowed (non-finite floats are tagged)")

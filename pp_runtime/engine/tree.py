"""The one encoding of nested values that cross a process: torch pytree leaves + a typed spec.

A value made of dicts, lists, tuples (and namedtuples) whose leaves are tensors or plain
values (None, bool, int, float, str, ``torch.Size``, ``torch.dtype``) becomes JSON — the
pytree's own spec (``treespec_dumps``) and one typed description per leaf — plus its
tensors, named ``<prefix>.<j>`` (each tensor object once: a value may hold one tensor
twice).  Objects of other classes that a caller knows how to take apart (ComfyUI's CLIP
vision outputs, its weight adapters) go as a typed node: ``encode(obj)`` gives (type name,
plain value), ``decode(name, value)`` builds the object again.  Everything else is refused
with ``TreeError`` naming where it is.  JSON, never pickle: nothing received is unpickled.

``pack``/``unpack`` put the JSON into a control message (the job) and the tensors beside
it; ``to_message``/``from_message`` make one tensor dict of it for the point-to-point
channels (the JSON as a uint8 tensor, padded so that its length, and so the channel's
cached schema, stays the same from pass to pass).
"""
from __future__ import annotations

import functools
import json

import torch
from torch.utils import _pytree as pytree

SPEC = "__tree"  # the key of the JSON in a tensor-dict message
_PAD = 256


class TreeError(ValueError):
    """A value that cannot be carried (a leaf or a structure the encoding does not know)."""


def _leaf(leaf, j_of, what: str) -> dict:
    if torch.is_tensor(leaf):
        return {"t": j_of(leaf)}
    if leaf is None or isinstance(leaf, (bool, int, float, str)):
        return {"v": leaf}
    if isinstance(leaf, torch.Size):
        return {"size": list(leaf)}
    if isinstance(leaf, torch.dtype):
        return {"dtype": str(leaf).removeprefix("torch.")}
    raise TreeError(f"{what} holds {type(leaf).__name__}, which cannot be carried to the workers")


TYPED = "__type__"  # a typed node: {TYPED: name, "value": its plain value}


def _is_leaf(x) -> bool:
    return isinstance(x, torch.Size)


def _encode(value, encode):
    """Typed objects (pytree leaves to torch: their classes are not registered) -> typed nodes."""
    def one(x):
        typed = encode(x) if not torch.is_tensor(x) else None
        return x if typed is None else {TYPED: typed[0], "value": _encode(typed[1], encode)}
    return pytree.tree_map(one, value, is_leaf=_is_leaf)


def _decode(value, decode):
    def typed(x):
        return isinstance(x, dict) and TYPED in x
    return pytree.tree_map(lambda x: decode(x[TYPED], _decode(x["value"], decode)) if typed(x) else x, value,
                           is_leaf=lambda x: typed(x) or _is_leaf(x))


def _where(value, leaf) -> str:
    """Where ``leaf`` is in ``value`` (e.g. ``[0]['processor']``), for an error message."""
    try:
        for path, x in pytree.tree_flatten_with_path(value, is_leaf=_is_leaf)[0]:
            if x is leaf:
                return pytree.keystr(path)
    except Exception:
        pass
    return ""


_DUMPED: dict = {}  # tree structure -> its JSON: a LoRA's thousand keys share one structure


def _dumps(spec) -> str:
    """``treespec_dumps``, once per structure (it walks the structure as dataclasses: ~10 ms
    for a LoRA key's patch list, i.e. seconds per prompt for a LoRA on every linear)."""
    try:
        return _DUMPED[spec]
    except KeyError:
        pass
    except TypeError:  # a structure that does not hash
        return pytree.treespec_dumps(spec)
    if len(_DUMPED) >= 256:
        _DUMPED.pop(next(iter(_DUMPED)))
    out = _DUMPED[spec] = pytree.treespec_dumps(spec)
    return out


@functools.lru_cache(maxsize=256)
def _loads(dumped: str):
    return pytree.treespec_loads(dumped)


def pack(value, prefix: str, tensors: dict, what: str = "a value", encode=None) -> dict:
    """``value`` as JSON-able data; its tensors go into ``tensors``.  ``encode(obj)``: (type
    name, plain value) for an object to carry as a typed node, else None."""
    if encode is not None:
        value = _encode(value, encode)
    leaves, spec = pytree.tree_flatten(value, is_leaf=_is_leaf)
    seen: dict[int, int] = {}

    def j_of(t):
        j = seen.setdefault(id(t), len(seen))
        tensors[f"{prefix}.{j}"] = t
        return j
    described = []
    for leaf in leaves:
        try:
            described.append(_leaf(leaf, j_of, what))
        except TreeError as e:
            where = _where(value, leaf)
            raise TreeError(f"{what}{f' at {where}' if where else ''} holds {type(leaf).__name__}, which cannot "
                            f"be carried to the workers") from e
    try:
        dumped = _dumps(spec)
    except Exception as e:  # a dict with non-string keys, a custom pytree node ...
        raise TreeError(f"{what} has a structure that cannot be carried to the workers ({e})") from None
    return {"spec": dumped, "leaves": described}


def unpack(packed: dict, prefix: str, tensors: dict, decode=None):
    """The inverse of ``pack`` (``decode(name, value)``: the object of a typed node)."""
    def leaf(d):
        if "t" in d:
            return tensors[f"{prefix}.{d['t']}"]
        if "size" in d:
            return torch.Size(d["size"])
        if "dtype" in d:
            return getattr(torch, d["dtype"])
        return d["v"]
    value = pytree.tree_unflatten([leaf(d) for d in packed["leaves"]], _loads(packed["spec"]))
    return _decode(value, decode) if decode is not None else value


def to_message(value, what: str = "a value") -> dict[str, torch.Tensor]:
    """One tensor dict: the tensors as ``t.<j>``, the spec as a padded uint8 tensor."""
    tensors: dict[str, torch.Tensor] = {}
    data = json.dumps(pack(value, "t", tensors, what)).encode()
    data += b" " * (-len(data) % _PAD)
    return {SPEC: torch.frombuffer(bytearray(data), dtype=torch.uint8), **tensors}


def from_message(msg: dict[str, torch.Tensor]):
    return unpack(json.loads(msg[SPEC].numpy().tobytes().decode()), "t", msg)

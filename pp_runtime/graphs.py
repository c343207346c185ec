"""CUDA graphs for patch passes: a patch's stage call replayed, not launched again.

A patched pass runs a stage's blocks M times on 1/M of the tokens.  On a fast GPU a block
on a few thousand tokens takes less time than the Python that launches its kernels
(ComfyUI's block code, its ops, the hooks), so the GPUs wait on the CPU and patches make a
step slower (Flux 1024², 4 patches: 0.68x before this).  So from the second time the same
call comes (same stage, input shapes, CFG branch, patch), its whole stage call — ComfyUI's
own forward up to the stage boundary, with the keys/values cache writes, or the last
stage's head — is captured once as a CUDA graph and replayed from then on: the inputs are
copied into the graph's input buffers, the graph is replayed, the outputs are copied out.

What a graph bakes in is in its key: every input tensor's shape, dtype and device, every
non-tensor input's value, the patch (mode, branch, index, count).  What it reads besides
its inputs must keep its address: the stage's weights and its keys/values cache (the
cache is refilled in place; ``clear()`` when weights move or change).  A call with an
input on the host, or whose forward cannot be captured (a host copy or a sync inside,
e.g. Wan's time embedding builds a table on the host), runs eagerly from then on, as
before: graphs only ever remove launch time.  ``PP_CUDA_GRAPHS=0`` turns them off.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

log = logging.getLogger(__name__)


class _Unkeyable(Exception):
    pass


def _key(obj, leaves: list):
    """A hashable description of ``obj`` (tensors by shape, dtype, device; other values by
    value), collecting its device tensors into ``leaves``."""
    if torch.is_tensor(obj):
        if obj.device.type != "cuda":
            raise _Unkeyable(f"a host tensor {tuple(obj.shape)}")
        leaves.append(obj)
        return ("T", tuple(obj.shape), obj.dtype, obj.device.index)
    if isinstance(obj, dict):
        return ("D",) + tuple((k, _key(v, leaves)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__,) + tuple(_key(v, leaves) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device)):
        return obj
    raise _Unkeyable(f"an input of type {type(obj).__name__}")


def _rebuild(obj, static):
    """``obj`` with its tensors replaced, in ``_key`` order, by the next of ``static``."""
    if torch.is_tensor(obj):
        return next(static)
    if isinstance(obj, dict):
        return {k: _rebuild(v, static) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rebuild(v, static) for v in obj)
    return obj


def _copy_out(out):
    if torch.is_tensor(out):
        return out.clone()
    if isinstance(out, dict):
        return {k: _copy_out(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_copy_out(v) for v in out)
    return out


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list
    out: object


class PatchGraphs:
    """One stage's captured patch calls, by key; eager until a call comes a second time."""

    def __init__(self, limit: int = 96):
        self.enabled = os.environ.get("PP_CUDA_GRAPHS", "1") != "0"
        self.limit = limit          # graphs kept (each holds its inputs and outputs); then all are dropped
        self.graphs: dict = {}
        self.seen: set = set()
        self.pool = None            # one memory pool for this stage's graphs (replayed one at a time)
        self.failed: str | None = None  # why this stage's forward cannot be captured (then: eager)
        self.replays = 0

    def clear(self) -> None:
        """Drop every graph (their memory with them): weights or the cache moved."""
        self.graphs.clear()
        self.seen.clear()
        self.pool = None

    def __call__(self, fn, args, kwargs, state_in, patch, before_replay=None):
        """``fn(args, kwargs, state_in, patch)``, eagerly or by replaying its graph."""
        if not self.enabled or self.failed is not None:
            return fn(args, kwargs, state_in, patch)
        leaves: list = []
        try:
            key = (_key((args, kwargs, state_in, patch.outputs), leaves),
                   patch.mode, patch.branch, patch.index, patch.count)
        except _Unkeyable:
            return fn(args, kwargs, state_in, patch)
        if not leaves:
            return fn(args, kwargs, state_in, patch)
        g = self.graphs.get(key)
        if g is None:
            if key not in self.seen:  # the first time: eagerly (kernels chosen, workspaces made)
                self.seen.add(key)
                return fn(args, kwargs, state_in, patch)
            if len(self.graphs) >= self.limit:
                self.clear()
            g = self._capture(fn, args, kwargs, state_in, patch, leaves)
            if g is None:
                return fn(args, kwargs, state_in, patch)
            self.graphs[key] = g
        if before_replay is not None:
            before_replay()
        for static, t in zip(g.inputs, leaves):
            static.copy_(t)
        g.graph.replay()
        self.replays += 1
        return _copy_out(g.out)

    def _capture(self, fn, args, kwargs, state_in, patch, leaves) -> _Graph | None:
        inputs = [t.clone() for t in leaves]
        s_args, s_kwargs, s_state, s_outputs = _rebuild((args, kwargs, state_in, patch.outputs), iter(inputs))
        s_patch = dataclasses.replace(patch, outputs=s_outputs)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # torch.cuda.graph without its device sync, gc and cache flush per capture (a pass of 8
        # patches captures 8 graphs per rank); thread-local: the worker's other threads
        # (heartbeat, streaming) may use CUDA meanwhile.
        side, here = torch.cuda.Stream(), torch.cuda.current_stream()
        side.wait_stream(here)
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    out = fn(s_args, s_kwargs, s_state, s_patch)
                finally:
                    graph.capture_end()
            here.wait_stream(side)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # something in the forward cannot be captured: eager from now on
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log.warning("patch pipelining: this stage's forward cannot be captured as a CUDA graph (%s); "
                        "its patches run eagerly", self.failed)
            self.clear()
            torch.cuda.synchronize()
            return None
        return _Graph(graph, inputs, out)

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
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

log = logging.getLogger(__name__)


_VALUES = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _flatten(inputs) -> tuple[list, object] | None:
    """``inputs``' leaves and a key for what a graph of them bakes in: each device tensor's
    shape, dtype and device, every other leaf's value; None if a graph cannot take them (a
    host tensor, a value that is not plain data)."""
    leaves, spec = tree_flatten(inputs)
    described = []
    for v in leaves:
        if torch.is_tensor(v):
            if v.device.type != "cuda":
                return None
            described.append((tuple(v.shape), v.dtype, v.device.index))
        elif isinstance(v, _VALUES):
            described.append(v)
        else:
            return None
    return leaves, (spec, tuple(described))


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
        flat = _flatten((args, kwargs, state_in, patch.outputs))
        if flat is None:
            return fn(args, kwargs, state_in, patch)
        leaves, (spec, described) = flat
        tensors = [v for v in leaves if torch.is_tensor(v)]
        if not tensors:
            return fn(args, kwargs, state_in, patch)
        key = (spec, described, patch.mode, patch.branch, patch.index, patch.count)
        g = self.graphs.get(key)
        if g is None:
            if key not in self.seen:  # the first time: eagerly (kernels chosen, workspaces made)
                self.seen.add(key)
                return fn(args, kwargs, state_in, patch)
            if len(self.graphs) >= self.limit:
                self.clear()
            g = self._capture(fn, leaves, spec, patch)
            if g is None:
                return fn(args, kwargs, state_in, patch)
            self.graphs[key] = g
        if before_replay is not None:
            before_replay()
        for static, t in zip(g.inputs, tensors):
            static.copy_(t)
        g.graph.replay()
        self.replays += 1
        return tree_map_only(torch.Tensor, torch.Tensor.clone, g.out)

    def _capture(self, fn, leaves, spec, patch) -> _Graph | None:
        static = [v.clone() if torch.is_tensor(v) else v for v in leaves]
        s_args, s_kwargs, s_state, s_outputs = tree_unflatten(static, spec)
        s_patch = dataclasses.replace(patch, outputs=s_outputs)
        inputs = [v for v in static if torch.is_tensor(v)]
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

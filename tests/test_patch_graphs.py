"""GPU only: patch calls replayed as CUDA graphs equal the eager calls.

Patch pipelining captures a patch's stage call (ComfyUI's forward up to the stage boundary,
the keys/values cache writes; the last stage's head) the second time it comes, and replays
it after that (``pp_runtime/graphs.py``).  On ComfyUI's own tiny models, two stages in one
process on the first GPU:

* replays equal the eager calls of the same inputs, bit for bit, for every family whose
  forward can be captured; the others (a host copy inside, Wan's time embedding) say why
  and run eagerly;
* a replay reads the cache as it is now: after a fill with other inputs (refilled in
  place), the replay equals the eager call on the new cache; a cache of a new shape drops
  the graphs;
* new weights (a LoRA, a stage moved) drop the graphs: the next calls are eager and right.

Skipped without CUDA (CI has none); run on the lent GPUs: ``pytest tests/test_patch_graphs.py``.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_map_only

from comfy_env import require_comfy

COMFY_ROOT = require_comfy()

if not torch.cuda.is_available():
    pytest.skip("CUDA graphs need a GPU", allow_module_level=True)

import family_zoo as zoo  # noqa: E402
from pp_runtime.comfy.families import family_for  # noqa: E402
from pp_runtime.comfy.token_patches import PatchCall  # noqa: E402
from pp_runtime.comfy.staging import StageForward, block_modules  # noqa: E402
from test_staging import recorded_calls  # noqa: E402

CAPTURED = ["flux1_dev", "flux2", "chroma", "qwen_image", "hunyuan_video"]
FAMILIES = CAPTURED + ["wan21_t2v"]
DEV = torch.device("cuda:0")


def _setup(name):
    dm, calls = recorded_calls(zoo.BY_NAME[name])
    dm = dm.to(DEV)
    fam = family_for(dm)
    n = len(block_modules(dm, fam))
    stages = [(0, n // 2), (n // 2, n)]
    forwards = [StageForward(dm, fam, a, b, j == 0, j == 1) for j, (a, b) in enumerate(stages)]
    args, kwargs = tree_map_only(torch.Tensor, lambda t: t.to(DEV), calls[0])
    return dm, forwards, args, kwargs


def _fill(forwards, args, kwargs, key=(0,)):
    state = forwards[0](args, kwargs, None, PatchCall("fill", key))
    return forwards[1](args, kwargs, state, PatchCall("fill", key))


def _patched(forwards, args, kwargs, count=3, key=(0,)):
    """A patched pass after a fill of ``args`` (a patched pass writes its own keys/values into
    the cache, so each one starts from the same cache)."""
    _fill(forwards, args, kwargs, key)
    outs = []
    for p in range(count):
        state = forwards[0](args, kwargs, None, PatchCall("patch", key, p, count))
        outs.append({k: v.clone() for k, v in forwards[1](args, kwargs, state, PatchCall("patch", key, p, count)).items()})
    return forwards[1](args, kwargs, None, PatchCall("head", key, count=count, outputs=outs))


def _eager(forwards, fn):
    for f in forwards:
        f.graphs.enabled = False
    try:
        return fn()
    finally:
        for f in forwards:
            f.graphs.enabled = True


@pytest.mark.parametrize("name", FAMILIES)
def test_replayed_patches_equal_eager_ones(name):
    dm, forwards, args, kwargs = _setup(name)
    with torch.inference_mode():
        ref = _eager(forwards, lambda: _patched(forwards, args, kwargs))
        outs = [_patched(forwards, args, kwargs) for _ in range(3)]  # eager, captured, replayed
        for out in outs:
            assert torch.equal(out, ref)
        failed = [f.graphs.failed for f in forwards if f.graphs.failed]
        if name in CAPTURED:
            assert not failed, failed
            assert all(f.graphs.replays > 0 for f in forwards)
            assert len(forwards[1].graphs.graphs) == 3 + 1  # 3 patches and the head
        else:
            assert failed, "expected this forward not to be capturable; update CAPTURED"
            print(f"{name}: eager ({failed[0]})")

        # the cache refilled in place from other inputs: the replay reads it as it is now
        x2 = args[0] + 0.05 * torch.randn_like(args[0])
        args2 = (x2,) + tuple(args[1:])
        ref2 = _eager(forwards, lambda: _patched(forwards, args2, kwargs))
        assert torch.equal(_patched(forwards, args2, kwargs), ref2)
        assert not torch.equal(ref2, ref)

        # new weights: graphs dropped, the next calls eager and right
        if name in CAPTURED:
            w = next(p for p in block_modules(dm, family_for(dm))[-1][1].parameters() if p.dim() == 2)
            w.data = w.data * 1.5  # a new tensor, as ComfyUI's LoRA patching sets one
            for f in forwards:
                f.graphs.clear()
            ref3 = _eager(forwards, lambda: _patched(forwards, args, kwargs))
            got = [_patched(forwards, args, kwargs) for _ in range(3)]
            assert all(torch.equal(g, ref3) for g in got) and not torch.equal(ref3, ref)


def test_a_new_cache_shape_drops_the_graphs():
    dm, forwards, args, kwargs = _setup("flux1_dev")
    with torch.inference_mode():
        for _ in range(2):
            _patched(forwards, args, kwargs)
        assert forwards[1].graphs.graphs
        x = torch.randn(args[0].shape[:2] + (args[0].shape[2] * 2,) + args[0].shape[3:], device=DEV)
        _fill(forwards, (x,) + tuple(args[1:]), kwargs)
        assert not forwards[0].graphs.graphs and not forwards[1].graphs.graphs

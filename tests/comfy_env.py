"""Find and import a ComfyUI source tree for tests (tiers 2 and 3).

ComfyUI is looked up in ``$COMFYUI_ROOT``, else in the folder two levels above this
repository (the pack normally lives in ``<ComfyUI>/custom_nodes/<pack>``; in CI the
repo and a ComfyUI tree may be siblings under one parent, so ``<parent>/ComfyUI`` is tried
too; ``.ci/run`` sets ``COMFYUI_ROOT`` to the tree it finds or unpacks).

Usage in a test module::

    from comfy_env import require_comfy
    comfy_root = require_comfy()   # skips the whole module, with the reason, if absent
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def find_comfy_root() -> Path | None:
    """The ComfyUI source root, or None."""
    candidates = []
    if os.environ.get("COMFYUI_ROOT"):
        candidates.append(Path(os.environ["COMFYUI_ROOT"]))
    candidates += [REPO.parents[1], REPO.parent / "ComfyUI"]
    for c in candidates:
        if (c / "comfy" / "model_management.py").is_file():
            return c.resolve()
    return None


def import_comfy() -> tuple[Path | None, str]:
    """Put the ComfyUI root first on sys.path and import comfy for CPU use.

    Returns (root, "") on success, (None, reason) otherwise.
    """
    root = find_comfy_root()
    if root is None:
        return None, ("ComfyUI not found: set COMFYUI_ROOT to a ComfyUI source tree "
                      f"(looked in $COMFYUI_ROOT, {REPO.parents[1]}, {REPO.parent / 'ComfyUI'})")
    # First on sys.path: ComfyUI's comfy/utils.py etc. must win over same-named packages.
    if sys.path[:1] != [str(root)]:
        if str(root) in sys.path:
            sys.path.remove(str(root))
        sys.path.insert(0, str(root))
    if str(REPO) not in sys.path:  # this pack's pp_runtime, after ComfyUI
        sys.path.insert(1, str(REPO))
    try:
        from comfy.cli_args import args
        args.cpu = True   # must precede the first import of comfy.model_management
        import comfy.model_management  # noqa: F401
        import comfy.ops  # noqa: F401
    except Exception as e:  # a broken/partial install should skip, not error, tier 2
        return None, f"ComfyUI at {root} is not importable: {type(e).__name__}: {e}"
    return root, ""


def comfy_version() -> str:
    """The found ComfyUI's version (its ``comfyui_version.py``), e.g. ``0.33.0``: what the
    test caches are keyed by."""
    root = find_comfy_root()
    if root is None:
        return "none"
    text = (root / "comfyui_version.py").read_text() if (root / "comfyui_version.py").is_file() else ""
    import re
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return m.group(1) if m else "unknown"


def must_run() -> bool:
    """``PP_REQUIRE_COMFY=1`` (set by .ci/run): a ComfyUI tier that cannot run fails, never skips."""
    return os.environ.get("PP_REQUIRE_COMFY", "0") == "1"


def require_comfy() -> Path:
    """Import ComfyUI, or skip the calling test module with the reason (fail under
    ``PP_REQUIRE_COMFY=1``)."""
    import pytest

    root, reason = import_comfy()
    if root is None:
        if must_run():
            pytest.fail(f"PP_REQUIRE_COMFY=1 and {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    return root

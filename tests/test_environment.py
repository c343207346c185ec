"""What a worker inherits from the ComfyUI process: GPUs through the parent's visibility,
ComfyUI's flags, the loopback interface (tier 1; the flags' effect in a worker: tier 2)."""
from __future__ import annotations

import socket

import pytest

from pp_runtime.workers.environment import ENV_FLAGS, apply_comfy_flags, loopback_interface
from pp_runtime.workers.group import worker_env


@pytest.mark.parametrize("var", ["CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"])
def test_gpu_index_maps_through_the_parents_visibility(monkeypatch, var):
    """ComfyUI started with --cuda-device, in a container or under a scheduler sees a subset of
    the GPUs: 'cuda:1' is the second GPU *it* sees, not the host's second GPU."""
    other = "HIP_VISIBLE_DEVICES" if var == "CUDA_VISIBLE_DEVICES" else "CUDA_VISIBLE_DEVICES"
    monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(var, "2,GPU-5f1c0a3e,7")
    assert worker_env("cuda:0", 3)[var] == "2"
    assert worker_env("cuda:1", 3)[var] == "GPU-5f1c0a3e"
    assert worker_env("cuda:2", 3)[var] == "7"
    with pytest.raises(ValueError, match=f"ComfyUI sees 3 GPU.*{var}=2,GPU-5f1c0a3e,7"):
        worker_env("cuda:3", 4)


def test_without_parent_visibility_the_index_is_the_hosts(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    env = worker_env("cuda:5", 6)
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and "HIP_VISIBLE_DEVICES" not in env
    assert worker_env("cpu", 2)["CUDA_VISIBLE_DEVICES"] == ""


def test_loopback_interface_exists_here(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    name = loopback_interface()
    assert name in [n for _, n in socket.if_nameindex()]
    assert worker_env("cpu", 2)["GLOO_SOCKET_IFNAME"] == name


def test_flags_carried_and_applied():
    """The ComfyUI process's flags are in every worker's environment; a worker applies them
    before it imports ComfyUI's model management."""
    from comfy_env import import_comfy
    if import_comfy()[0] is None:
        pytest.skip("needs ComfyUI")
    import json
    from comfy.cli_args import PerformanceFeature, args
    old = (args.force_upcast_attention, args.fast)
    try:
        args.force_upcast_attention, args.fast = True, {PerformanceFeature.Fp16Accumulation}
        env = json.loads(worker_env("cpu", 2)[ENV_FLAGS])
        assert env["force_upcast_attention"] is True and env["fast"] == [PerformanceFeature.Fp16Accumulation.value]
        assert "lowvram" not in env and "listen" not in env  # memory and server flags stay behind
        args.force_upcast_attention, args.fast = False, set()
        apply_comfy_flags(env)
        assert args.force_upcast_attention is True and args.fast == {PerformanceFeature.Fp16Accumulation}
    finally:
        args.force_upcast_attention, args.fast = old


def test_every_flag_of_this_comfyui_is_carried_or_left_with_a_reason():
    """The carried-flag list follows the running ComfyUI's cli_args.py: a flag a new release
    adds (v0.33: --use-ck-attention, --fp16-intermediates, --disable-cuda-graphs ...) fails
    here until it is carried or left behind with its reason."""
    from comfy_env import import_comfy
    if import_comfy()[0] is None:
        pytest.skip("needs ComfyUI")
    from comfy.cli_args import args
    from pp_runtime.workers.environment import CARRIED_FLAGS, NOT_CARRIED
    left = {f for flags in NOT_CARRIED.values() for f in flags}
    assert not set(CARRIED_FLAGS) & left
    unknown = sorted(f for f in vars(args) if f not in CARRIED_FLAGS and f not in left)
    assert unknown == [], f"ComfyUI flags neither carried nor left behind: {unknown}"


def test_new_flags_and_a_list_valued_verbose_are_carried():
    """v0.33: the kernel flags reach the workers; --verbose is a list of (level, file) and
    only its console level travels (a file path of the host is no worker's business)."""
    from comfy_env import import_comfy
    if import_comfy()[0] is None:
        pytest.skip("needs ComfyUI")
    import json
    from comfy.cli_args import args
    new = [f for f in ("use_ck_attention", "fp16_intermediates", "disable_cuda_graphs", "enable_triton_backend")
           if hasattr(args, f)]
    old = {f: getattr(args, f) for f in new + ["verbose"]}
    try:
        for f in new:
            setattr(args, f, True)
        args.verbose = [("DEBUG", "/var/log/comfy.log"), ("WARNING", None)] if isinstance(args.verbose, list) \
            else "WARNING"
        env = json.loads(worker_env("cpu", 2)[ENV_FLAGS])
        assert all(env[f] is True for f in new)
        assert env["verbose"] == "WARNING" and "/var/log" not in json.dumps(env)
    finally:
        for f, v in old.items():
            setattr(args, f, v)


def test_requirements_leave_comfyui_environment_alone():
    """ComfyUI-Manager installs requirements.txt into the user's environment: it must name no
    package (torch above all); the nodes' modules import no diffusers."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    lines = [ln.split("#")[0].strip() for ln in (root / "requirements.txt").read_text().splitlines()]
    assert [ln for ln in lines if ln] == []
    code = ("import sys; import pp_runtime.comfy.job, pp_runtime.workers.registry, pp_runtime.comfy.staging, pp_runtime.comfy.families; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)

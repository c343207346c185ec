"""ComfyUI's model for one rank: meta everywhere except this stage's weights.
"""
from __future__ import annotations

import time

import torch

from . import carry
from . import loading
from .families import family_for
from .staging import StageForward, stage_prefixes


# -- placement -----------------------------------------------------------------------
class ComfyStage:
    """ComfyUI's model for this rank: meta everywhere except this stage's weights (its
    blocks and the shared non-block weights)."""

    def __init__(self, spec: dict, stage_range: tuple[int, int], topo, device):
        hwm0, t0 = _peak_rss(), time.perf_counter()
        start, end = stage_range
        self.range = (start, end)
        self.dtype = loading.dtype_of(spec["dtype"])
        loading.check_stamp(spec)  # every rank reads the file the job was built for
        self.base, layout = loading.meta_base_model(spec["path"], self.dtype, loading.dtype_of(spec.get("manual_cast")),
                                               spec.get("config"), real_buffers=True)
        dm = self.base.diffusion_model
        self.family = family_for(dm)
        prefixes = stage_prefixes(dm, self.family, start, end, topo.is_first, topo.is_last)
        t1 = time.perf_counter()
        self.bytes_read = loading.load_stage_weights(dm, spec["path"], layout, prefixes, device)
        _sync(device)
        t2 = time.perf_counter()
        self.base.model_sampling.to(device)
        # Buffers the model computes itself (not in the file) go to the device; saved ones of
        # other stages' blocks (allocated by the constructor, never filled) are dropped.
        saved = loading.saved_names(dm)
        for name, buf in list(dm.named_buffers()):
            if name in saved and not name.startswith(tuple(prefixes)):
                _set_buffer(dm, name, buf.to("meta"))
            elif not buf.is_meta and buf.device != torch.device(device):
                _set_buffer(dm, name, buf.to(device))
        self.forward = StageForward(dm, self.family, start, end, topo.is_first, topo.is_last)
        _sync(device)
        # Where placing went (seconds): ComfyUI's model class on meta from the header, this
        # stage's weights read and copied onto the device, the rest (buffers, the forward).
        self.load_phases = {"model_s": t1 - t0, "weights_s": t2 - t1, "rest_s": time.perf_counter() - t2,
                            "weights_gb_per_s": self.bytes_read / max(t2 - t1, 1e-9) / 1e9}
        # What placing this stage cost in host RAM at its peak (measured, for the tests and the panel).
        self.load_peak_growth = _peak_rss() - hwm0
        self.device, self.stage = torch.device(device), topo.pp_rank
        self._spec, self._layout, self._prefixes = spec, layout, prefixes  # to read the stage again (park)
        self._parked = False
        self.backup: dict[str, torch.Tensor] = {}  # unpatched weights of the keys patched now
        self.patches_id = ""
        # The last rank's MODEL for ComfyUI's sampler: one per placed stage, kept across jobs
        # (each job samples with a clone of it, as stock samples with clones of the loader's
        # MODEL), so ComfyUI's model management never finds a dead entry of an earlier job.
        self.patcher = None

    @property
    def parked(self) -> bool:
        return self._parked

    def park(self) -> None:
        """Free this stage's weights (device memory; host RAM on a CPU worker) and keep the
        stage: ``unpark`` reads them again from the file they came from, which the OS page
        cache keeps in host RAM while there is room (~12-15 GB/s on an H200 host, where a copy
        into pageable host memory and back ran at ~1.5 GB/s).  Weight patches are applied
        again by the next job (the host sends them again: ``patches_id`` is reset)."""
        import comfy.utils
        names = [n for n, p in self.base.diffusion_model.named_parameters()
                 if not p.is_meta and n in self._layout.load]
        for name in names:
            p = self.base.diffusion_model.get_parameter(name)
            comfy.utils.set_attr_param(self.base.diffusion_model, name, p.data.to("meta"))
        self.backup, self.patches_id = {}, ""
        self.forward.graphs.clear()  # captured patch calls read the weights where they were
        self._parked = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def unpark(self) -> None:
        loading.check_stamp(self._spec)  # the file it was read from, unchanged
        self.bytes_read = loading.load_stage_weights(self.base.diffusion_model, self._spec["path"], self._layout,
                                                     self._prefixes, self.device)
        _sync(self.device)
        self._parked = False

    def apply_weight_patches(self, job: dict, tensors: dict) -> bool:
        """Weight patches (LoRA) for this stage's keys, with ComfyUI's own patch math.

        The base weights stay in memory unpatched (``backup``), so a new LoRA or strength
        re-patches from them: nothing is read from disk again.  Returns whether it patched.
        """
        if job.get("patches_id", "") == self.patches_id:
            return False
        import comfy.model_patcher
        import comfy.utils
        for key, weight in self.backup.items():
            comfy.utils.set_attr_param(self.base, key, weight)
        self.backup = {}
        patches = carry.unpack_weight_patches(job.get("patches", {}), tensors, self.stage)
        if patches:
            patcher = comfy.model_patcher.ModelPatcher(self.base, load_device=self.device,
                                                       offload_device=self.device)
            patcher.patches = patches
            for key in patches:
                patcher.patch_weight_to_device(key, device_to=self.device)
            self.backup = {k: v.weight for k, v in patcher.backup.items()}
        self.patches_id = job.get("patches_id", "")
        self.forward.graphs.clear()  # new weight tensors
        return True


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _set_buffer(module, name: str, value) -> None:
    owner, _, leaf = name.rpartition(".")
    (module.get_submodule(owner) if owner else module)._buffers[leaf] = value


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM), in bytes; 0 where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0

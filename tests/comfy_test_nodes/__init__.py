"""Test-only ComfyUI nodes for the tier-3 server tests (never shipped with the pack).

``PPTestModel``, ``PPTestFamilyConditioning`` and ``PPTestFamilyLatent`` build a model of
every family, its conditioning and its latent from ``tests/family_zoo.py``.

The test models (tests/make_models.py) have no text encoders, and no stock node makes
CONDITIONING without a CLIP model, so ``PPTestConditioning`` makes a seeded random one:
``[[context [1, length, dim], {"pooled_output": [1, pooled_dim]}]]`` (the pooled vector
only when ``pooled_dim > 0``: Flux reads it as ``y``; Wan 2.1 t2v needs only the context).
``PPTestNoisyLatent`` adds seeded noise to a latent (a non-empty input for denoise < 1).
Flux's ``guidance`` is left to the model's default (3.5) unless ``guidance >= 0``.

The harness (tests/server_util.py) links this folder into the test server's
custom_nodes/ as ``pp_test_nodes`` and whitelists it next to the pack.
"""
import torch


class PPTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "length": ("INT", {"default": 8, "min": 1, "max": 4096}),
            "dim": ("INT", {"default": 4096, "min": 1, "max": 65536}),
            "pooled_dim": ("INT", {"default": 0, "min": 0, "max": 65536}),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}),
        }, "optional": {
            "guidance": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 100.0, "step": 0.1}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "_for_testing/pp"

    def make(self, seed, length, dim, pooled_dim, scale, guidance=-1.0):
        g = torch.Generator().manual_seed(int(seed))
        context = torch.randn((1, length, dim), generator=g, dtype=torch.float32) * scale
        extra = {}
        if pooled_dim > 0:
            extra["pooled_output"] = torch.randn((1, pooled_dim), generator=g, dtype=torch.float32) * scale
        if guidance is not None and guidance >= 0:
            extra["guidance"] = float(guidance)
        return ([[context, extra]],)


class PPTestNoisyLatent:
    """``latent + scale * seeded noise``: a non-empty latent for denoise < 1 tests."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "_for_testing/pp"

    def make(self, samples, seed, scale):
        x = samples["samples"]
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)
        out = dict(samples)
        out["samples"] = x + scale * noise
        return (out,)


class PPTestImageToVideo:
    """What WanImageToVideo adds to the conditioning, from seeded random tensors instead of
    a VAE and a CLIP vision model: ``concat_latent_image``, ``concat_mask`` (first frame
    given) and ``clip_vision_output`` (penultimate hidden states [1, 257, 1280])."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "latent": ("LATENT",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    FUNCTION = "make"
    CATEGORY = "_for_testing/pp"

    def make(self, positive, negative, latent, seed):
        import comfy.clip_vision
        import node_helpers
        x = latent["samples"]
        g = torch.Generator().manual_seed(int(seed))
        image = torch.randn((1,) + tuple(x.shape[1:]), generator=g)
        mask = torch.ones((1, 1) + tuple(x.shape[2:]))
        mask[:, :, :1] = 0.0
        clip = comfy.clip_vision.Output()
        clip["penultimate_hidden_states"] = torch.randn(1, 257, 1280, generator=g)
        values = {"concat_latent_image": image, "concat_mask": mask, "clip_vision_output": clip}
        return (node_helpers.conditioning_set_values(positive, values),
                node_helpers.conditioning_set_values(negative, values))


def _zoo():
    """tests/family_zoo.py (this package is linked into the test server's custom_nodes)."""
    import os
    import sys
    tests = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    if tests not in sys.path:
        sys.path.append(tests)
    import family_zoo
    return family_zoo


_CASE_NAMES = [c.name for c in _zoo().CASES]


class PPTestModel:
    """A MODEL of a family_zoo case built in the server with ComfyUI's own classes (the way
    its loader builds one) and the case's seeded weights: for families whose detection
    fixes sizes too large for a CPU test file.  PP KSampler hands it to the workers like
    any MODEL from the stock loader."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"case": (_CASE_NAMES,), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "make"
    CATEGORY = "_for_testing/pp"

    def make(self, case, seed):
        zoo = _zoo()
        return (zoo.model(zoo.BY_NAME[case], seed),)


class PPTestFamilyConditioning:
    """Positive and negative CONDITIONING of a family_zoo case (what the family's text,
    image and audio encoder nodes would add, as seeded random tensors)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"case": (_CASE_NAMES,), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    FUNCTION = "make"
    CATEGORY = "_for_testing/pp"

    def make(self, case, seed):
        zoo = _zoo()
        return zoo.conditioning(zoo.BY_NAME[case], seed)


class PPTestFamilyLatent:
    """An empty LATENT of a family_zoo case (LTX-2: video + audio, as LTXVConcatAVLatent makes it)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"case": (_CASE_NAMES,), "batch_size": ("INT", {"default": 1, "min": 1, "max": 8})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "_for_testing/pp"

    def make(self, case, batch_size):
        zoo = _zoo()
        return ({"samples": zoo.latent(zoo.BY_NAME[case], batch_size)},)


NODE_CLASS_MAPPINGS = {"PPTestConditioning": PPTestConditioning,
                       "PPTestModel": PPTestModel,
                       "PPTestFamilyConditioning": PPTestFamilyConditioning,
                       "PPTestFamilyLatent": PPTestFamilyLatent,
                       "PPTestNoisyLatent": PPTestNoisyLatent,
                       "PPTestImageToVideo": PPTestImageToVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"PPTestConditioning": "PP Test Conditioning (random, tests only)",
                              "PPTestModel": "PP Test Model (tests only)",
                              "PPTestFamilyConditioning": "PP Test Family Conditioning (tests only)",
                              "PPTestFamilyLatent": "PP Test Family Latent (tests only)",
                              "PPTestNoisyLatent": "PP Test Noisy Latent (tests only)",
                              "PPTestImageToVideo": "PP Test Image to Video (tests only)"}

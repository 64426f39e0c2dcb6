"""Test-only ComfyUI nodes: random CONDITIONING, so prompts run without a text encoder.

The real text encoders (LLaVA-Llama-3 8B and CLIP-L for HunyuanVideo, umT5-XXL for Wan) are gigabytes and
cannot be fetched here. This folder is linked into a temporary custom_nodes/ by the comfyui tests only; it
never ships with the pack (nodes/ holds the shipped nodes).
"""

import torch

WAN_TEXT_DIM = 4096  # umT5-XXL's width: ComfyUI builds every Wan with text_embedding.0 taking 4096


class QSTestConditioning:
    """HunyuanVideo's: the LLaVA context, CLIP-L's pooled output (vector_in) and the guidance."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "tokens": ("INT", {"default": 6, "min": 1, "max": 256}),
            "context_dim": ("INT", {"default": 64, "min": 1, "max": 8192}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "QuantSparse/testing"

    def make(self, seed, tokens, context_dim):
        g = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, context_dim, generator=g)
        pooled = torch.randn(1, 768, generator=g)  # CLIP-L pooled output feeds vector_in
        return ([[context, {"pooled_output": pooled, "guidance": 6.0}]],)


class QSTestWanConditioning:
    """Wan's, as CLIPTextEncode with umT5-XXL gives it: a ``[1, tokens, 4096]`` context and nothing else (no
    pooled output, no guidance). The real encoder pads to 512 tokens; tests use fewer to stay fast."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 1024}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "QuantSparse/testing"

    def make(self, seed, tokens):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, WAN_TEXT_DIM, generator=g), {}]],)


NODE_CLASS_MAPPINGS = {"QSTestConditioning": QSTestConditioning, "QSTestWanConditioning": QSTestWanConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"QSTestConditioning": "QS Test Conditioning (tests only)",
                              "QSTestWanConditioning": "QS Test Wan Conditioning (tests only)"}

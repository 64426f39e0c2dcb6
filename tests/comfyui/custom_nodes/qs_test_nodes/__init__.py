"""Test-only ComfyUI node: random HunyuanVideo CONDITIONING, so prompts run without a text encoder.

The real text encoders (LLaVA-Llama-3 8B, CLIP-L) are gigabytes and cannot be fetched here.
This folder is linked into a temporary custom_nodes/ by the comfyui tests only; it never ships
with the pack (nodes/ holds the shipped nodes).
"""

import torch


class QSTestConditioning:
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


NODE_CLASS_MAPPINGS = {"QSTestConditioning": QSTestConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"QSTestConditioning": "QS Test Conditioning (tests only)"}

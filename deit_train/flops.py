"""FLOPs as Lightning's model summary counts them (torch.utils.flop_counter, on the module's example_input_array:
one image, set by the classify task): a prediction's multiply-adds x 2. The DeiT paper's "FLOPs" are multiply-adds:
half the summary's number (DeiT-Ti: 1.3 G in the paper, 2.5 G here).

torch's counter has formulas for the CUDA attention kernels but none for the CPU one that
F.scaled_dot_product_attention runs on a CPU: a ViT's attention counted 0 there. It is registered here with torch's
own SDPA formula, so that the summary's total is the same on either device."""

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count


def count_cpu_attention() -> None:
    """Register the CPU attention kernel's FLOP formula with torch's counter (once per process)."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_registry:
        return

    @register_flop_formula(op)
    def cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

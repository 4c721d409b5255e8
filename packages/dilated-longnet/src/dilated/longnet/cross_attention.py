"""Dense cross-attention of the decoder layers over an encoder memory of any length."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dilated.core.checks import check_key_padding_mask
from dilated.longnet.checks import check_layer_input

__all__ = ["CrossAttention"]


class CrossAttention(nn.Module):
    """Dense multi-head attention of ``(batch, n, d_model)`` queries over a memory
    ``(batch, m, d_model)`` of any length, through ``torch.nn.functional.scaled_dot_product_attention``.

    Dilated attention is defined for queries and keys of one shared sequence, so cross-attention
    is plain (non-dilated) attention; it carries the same MAGNETO sub-layer norm and init.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        *,
        dropout: float,
        bias: bool,
        layer_norm_eps: float,
        gamma_init: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.nhead, self.dropout = nhead, dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias, **fk)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias, **fk)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias, **fk)
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **fk)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **fk)
        for proj, gain in (
            (self.q_proj, 1.0),
            (self.k_proj, 1.0),
            (self.v_proj, gamma_init),
            (self.out_proj, gamma_init),
        ):
            nn.init.xavier_normal_(proj.weight, gain=gain)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_key_padding_mask: torch.Tensor | None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """``x`` ``(batch, n, d_model)``, ``memory`` ``(batch, m, d_model)``, mask ``(batch, m)``
        in PyTorch's convention (bool True or float ``-inf`` at ignored memory tokens); returns ``(batch, n, d_model)``. ``is_causal``: position
        ``i`` attends memory positions ``<= i`` only (needs ``m == n``)."""
        check_layer_input("memory", memory, x.shape[-1], ("the decoder input", x.shape[0]))
        b, n, d = x.shape
        m = memory.shape[1]
        if is_causal and m != n:
            raise ValueError(
                f"memory_is_causal=True needs a memory as long as the target, got {m} and {n}"
            )
        h = self.nhead
        q = self.q_proj(x).view(b, n, h, d // h).transpose(1, 2)
        k = self.k_proj(memory).view(b, m, h, d // h).transpose(1, 2)
        v = self.v_proj(memory).view(b, m, h, d // h).transpose(1, 2)
        try:
            keep = check_key_padding_mask(memory_key_padding_mask, memory)
        except ValueError as exc:
            raise ValueError(
                str(exc).replace("key_padding_mask", "memory_key_padding_mask")
            ) from None
        # SDPA's bool attn_mask is True where a key takes part: the internal form.
        mask = None if keep is None else keep[:, None, None, :]
        if is_causal:
            causal = torch.ones(n, m, dtype=torch.bool, device=x.device).tril()
            mask = causal if mask is None else mask & causal
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(b, n, d)
        projected: torch.Tensor = self.out_proj(self.norm(out))
        return projected

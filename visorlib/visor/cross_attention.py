"""Cross-attention from text to visual tokens, and the visual tokens' positional convolution.

Paper §4.2.1, eq. 2: ``Z = T + CrossAttn(T, V)``; the decoder layer then runs on ``Z`` (text only).
The visual tokens are never changed here, so the cost is ``O(N_t * N_v * d)`` instead of a
self-attention layer's ``O((N_v + N_t)^2 * d)``.

Visual tokens carry no rotary position in cross-attention (queries and keys come from different
streams); instead a depth-wise 1-D convolution over each image's token sequence (kernel 7,
padding 3, after Chu et al.'s conditional positional encodings) adds a positional signal. The
convolution never mixes tokens of different images or samples.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import DecoderConfig
from ..modules.layers import RMSNorm, attend


class ConvPositionalEmbedding(nn.Module):
    """``x + depthwise_conv1d(x)`` within each image's run of visual tokens.

    Args:
        dim: Channels.
        kernel: Odd kernel size (7 in the paper; padding is ``kernel // 2``).

    The weights start at zero, so a freshly added block leaves the visual tokens unchanged.
    """

    def __init__(self, dim: int, kernel: int = 7):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"conv kernel must be odd, got {kernel}")
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """Apply to ``x [B, N, D]`` whose tokens belong to ``segments [B, N]`` (-1 = padding).

        Each segment behaves as if convolved alone with zero padding at its ends: the sum over
        kernel taps only takes neighbours with the same segment id. (A shifted multiply-add per tap
        is cheaper than gathering every image into its own padded sequence.)
        """
        weight = self.conv.weight[:, 0, :]  # [D, k]
        half = weight.shape[1] // 2
        out = x + self.conv.bias
        for tap in range(weight.shape[1]):
            shift = tap - half
            if shift == 0:
                out = out + x * weight[:, tap]
                continue
            neighbour = torch.roll(x, -shift, dims=1)
            same = segments == torch.roll(segments, -shift, dims=1)
            # roll wraps around; positions whose neighbour wrapped are outside the sequence.
            index = torch.arange(x.shape[1], device=x.device) + shift
            same = same & (index >= 0) & (index < x.shape[1])
            out = out + neighbour * weight[:, tap] * same[..., None].to(x.dtype)
        return torch.where((segments >= 0)[..., None], out, x)


class CrossAttention(nn.Module):
    """Text queries attend to visual keys/values; the output is added to the text stream.

    Args:
        cfg: The decoder's hyper-parameters (width, heads, kv heads, eps).
        kernel: Kernel of the positional convolution on visual tokens.
        gated: Multiply the output by ``tanh(gate)`` with ``gate`` starting at 0, so that the block
            is a no-op at initialisation (for random initialisation).
    """

    def __init__(self, cfg: DecoderConfig, kernel: int = 7, gated: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.text_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.visual_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pos_embed = ConvPositionalEmbedding(cfg.hidden_size, kernel)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.gate = nn.Parameter(torch.zeros(())) if gated else None

    @torch.no_grad()
    def copy_from(self, layer: nn.Module) -> None:
        """Start from a decoder layer's self-attention, so the block first reads the image the way
        the dense layer did (same projections and input norm; no rotary, zero conv)."""
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(self, name).load_state_dict(getattr(attn, name).state_dict())
        self.text_norm.weight.copy_(layer.input_layernorm.weight)
        self.visual_norm.weight.copy_(layer.input_layernorm.weight)
        self.pos_embed.reset_parameters()

    @torch.no_grad()
    def reset_random(self, std: float = 0.02) -> None:
        """Random projections (normal(0, std)); the gate, if any, goes back to 0."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(proj.weight, std=std)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        self.text_norm.reset_parameters()
        self.visual_norm.reset_parameters()
        self.pos_embed.reset_parameters()
        if self.gate is not None:
            self.gate.zero_()

    def project_visual(self, visual: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, Hkv, N_v, head_dim]`` of the visual tokens (cacheable)."""
        x = self.visual_norm(self.pos_embed(visual, segments))
        shape = (*x.shape[:2], self.num_kv_heads, self.head_dim)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        return k, v

    def forward(
        self,
        text: torch.Tensor,
        mask: torch.Tensor,
        implementation: str = "sdpa",
        visual: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        visual_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``text + gate * o(attn(q(norm(text)), K_v, V_v))``.

        Args:
            text: ``[B, N_t, D]`` text stream.
            mask: Boolean ``[B, 1, N_t, N_v]``; a text token sees the visual tokens of earlier images.
            implementation: Attention backend.
            visual: ``[B, N_v, D]`` visual stream (projected here) ...
            segments: ... with its image ordinals for the positional convolution;
            visual_kv: ... or keys/values projected earlier (decoding reuses the prefill's).

        Returns:
            ``(updated text, (keys, values))``. Everything happens inside ``forward`` so that module
            hooks (FSDP2's parameter gathering, profilers) see every use of the weights.

        A text token that sees no visual token at all (nothing before it) gets a zero update, not
        the NaN a fully masked softmax would give.
        """
        if visual_kv is None:
            visual_kv = self.project_visual(visual, segments)
        k, v = visual_kv
        q = self.q_proj(self.text_norm(text)).view(*text.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)
        sees_any = mask.any(-1, keepdim=True)  # [B, 1, N_t, 1]
        out = attend(q, k, v, mask | ~sees_any, implementation)
        out = out * sees_any.to(out.dtype)
        update = self.o_proj(out.transpose(1, 2).reshape(*text.shape[:2], -1))
        if self.gate is not None:
            update = update * torch.tanh(self.gate)
        return text + update, visual_kv

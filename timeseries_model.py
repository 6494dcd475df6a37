"""TimeSeriesNet: the network of the ``torch`` member (no training code here; that is ``torch_pipeline``).

CNN -> BiLSTM -> BiGRU -> masked attention -> MLP head over the frame table's channels. The network
compacts real steps, pools the mask with the activations and packs the recurrent layers, so padding
neither leaks into the output nor depends on the pad side.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import metric
from config import Config


def _masked_max_pool(h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-pool (B, C, L) by 2 over real steps only; a pooled step is real if any of its inputs is.

    ceil_mode keeps the final odd step (the gesture is at the end). Padded steps
    are -inf before the max so a window mixing real and padded steps takes the
    real value, and come out as 0.
    """
    h = h.masked_fill(~mask[:, None, :], float("-inf"))
    h = nn.functional.max_pool1d(h, kernel_size=2, stride=2, ceil_mode=True)
    pooled = nn.functional.max_pool1d(mask[:, None, :].to(h.dtype), 2, 2, ceil_mode=True)[:, 0] > 0
    return h.masked_fill(~pooled[:, None, :], 0.0), pooled


class TimeSeriesNet(nn.Module):
    """Conv(k7)+BN+GELU+pool -> Conv(k5)+BN+GELU+pool -> Dropout -> BiLSTM -> BiGRU -> attention -> MLP head.

    ``forward(x (B, L, C), mask (B, L) bool) -> logits (B, n_classes)``. In eval
    mode the output depends only on the real steps (their values and order),
    not on pad contents, pad side or pad length.
    """

    def __init__(
        self,
        n_channels: int,
        n_classes: int = metric.N_CLASSES,
        conv1: int = 128,
        conv2: int = 256,
        rnn_hidden: int = 128,
        head_hidden: int = 256,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_channels, conv1, kernel_size=7, padding=3)
        self.bn1 = nn.BatchNorm1d(conv1)
        self.conv2 = nn.Conv1d(conv1, conv2, kernel_size=5, padding=2)
        self.bn2 = nn.BatchNorm1d(conv2)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(conv2, rnn_hidden, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(2 * rnn_hidden, rnn_hidden, batch_first=True, bidirectional=True)
        self.attn = nn.Sequential(nn.Linear(2 * rnn_hidden, rnn_hidden), nn.Tanh(), nn.Linear(rnn_hidden, 1))
        self.head = nn.Sequential(
            nn.Linear(2 * rnn_hidden, head_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(head_hidden, n_classes)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(x, mask)[0]

    def forward_with_attention(
        self, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, attention weights (B, L') and the pooled mask (B, L') the weights live on."""
        if x.dim() != 3 or mask.shape != x.shape[:2]:
            raise ValueError(f"expected x (B, L, C) and mask (B, L); got {tuple(x.shape)} and {tuple(mask.shape)}")
        mask = mask.to(torch.bool)
        full = bool(mask.all())  # e.g. one trimmed sequence at prediction time: nothing to compact or pack
        if not full:
            lengths = mask.sum(dim=1)
            # Move the real steps to the front in their order: pooling windows then start at the first real
            # step whatever the pad side, so left and right padding give the same result.
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
            x = torch.gather(x, 1, order[:, :, None].expand(-1, -1, x.shape[2]))
            steps = torch.arange(x.shape[1], device=x.device)
            # An all-padding row (never produced by pad_batch) keeps one zero step so packing stays valid.
            mask = steps[None, :] < lengths.clamp(min=1)[:, None]
            x = x.masked_fill(~mask[:, :, None], 0.0)  # pad contents can never leak

        h = x.transpose(1, 2)  # (B, C, L)
        h = self.act(self.bn1(self.conv1(h)))
        h = h.masked_fill(~mask[:, None, :], 0.0)  # conv2 must see zeros on padding, like its own zero padding
        h, mask = _masked_max_pool(h, mask)
        h = self.act(self.bn2(self.conv2(h)))
        h, mask = _masked_max_pool(h, mask)
        h = self.drop(h.transpose(1, 2))  # (B, L', conv2)

        if full:
            h, _ = self.lstm(h)
            h, _ = self.gru(h)
        else:
            # Packing keeps padded steps out of both recurrent directions.
            pooled_len = mask.sum(dim=1)
            packed = pack_padded_sequence(h, pooled_len.cpu(), batch_first=True, enforce_sorted=False)
            packed, _ = self.lstm(packed)
            packed, _ = self.gru(packed)
            h, _ = pad_packed_sequence(packed, batch_first=True, total_length=h.shape[1])

        scores = self.attn(h).squeeze(-1).float().masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        pooled = torch.bmm(weights[:, None, :].to(h.dtype), h).squeeze(1)
        return self.head(pooled), weights, mask


def model_args_from_config(n_channels: int, cfg: Config) -> dict[str, Any]:
    """Constructor arguments, stored in the bundle so loading rebuilds the same network."""
    t = cfg.torch
    return {
        "n_channels": int(n_channels),
        "n_classes": metric.N_CLASSES,
        "conv1": t.conv1_channels,
        "conv2": t.conv2_channels,
        "rnn_hidden": t.rnn_hidden,
        "head_hidden": t.head_hidden,
        "dropout": t.dropout,
    }


__all__ = ["TimeSeriesNet", "model_args_from_config"]

"""Padding-free attention for transformers models: rows packed back to back, attention per row.

The learner, the teacher and the sampler run a model on rows of different lengths. Padding them to
the longest row spends most of the forward and backward on padding when lengths are long-tailed
(RL responses are), so rows are packed back to back into one sequence of real tokens with per-row
position ids, and only attention, the one operation that mixes tokens, needs to know where a row
starts and ends. That is what this module provides, as an attention function registered with
transformers (`ATTENTION`; `use_packed_attention(model)` selects it). A call of the model chooses a
mode with one keyword argument, which transformers hands to every layer's attention:

* `packed=PackedRows(...)`: each token attends causally to the tokens of its own row, and a row
  with a context row first to all of that one: the G responses of a group continue their prompt,
  which is packed once (run once, its gradient summed once), not once per response.
  `PackedRows.keep` records every layer's keys and values, to fill a `DecodeCache`.
* `decode=DecodeCache(...)`: one new token per row, attending to that row's cached tokens.
* neither: plain SDPA, so the model still answers ordinary calls as before.

Kernels: on CUDA in bfloat16/float16, torch's own FlashAttention varlen kernel
(`torch.nn.attention.varlen.varlen_attn`: cumulative row offsets, no padding anywhere, causal
aligned to each row's last key so a row's context works, grouped-query heads; the kernel family veRL
and OpenRLHF reach through the flash-attn package, here without that extra dependency). Elsewhere
(CPU; float32 on CUDA) rows of similar length share a zero-padded `[rows, heads, width, head_dim]`
grid for the attention kernel only (SDPA's fused causal kernel), and the result is gathered back:
every projection and MLP still sees real tokens only, and the padded attention costs at most about
twice the rows' own. On CPU this measured fastest of the options torch and transformers offer:
transformers' packed `position_ids` path builds a dense block-diagonal mask over the whole packed
sequence (time and memory quadratic in the micro-batch), one SDPA call per row pays Python overhead
per row and layer, and FlexAttention has no backward on CPU (torch 2.15) (benchmarks/packing.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "rlsd_packed"
LayerKV = dict[int, tuple[torch.Tensor, torch.Tensor]]

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: the grid path everywhere
    varlen_attn = None


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Cumulative offsets `[R + 1]` (int32, as the varlen kernels take them) of rows of `lengths`."""
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def spans(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`start, start + 1, ..., start + length - 1` of every span in turn (long `[sum(lengths)]`)."""
    span = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    firsts = lengths.cumsum(0) - lengths
    return starts[span] + torch.arange(len(span), device=lengths.device) - firsts[span]


def _grid_slots(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Index of every packed token in a row-major `[R, width]` grid (row r starts at slot r * width)."""
    return spans(torch.arange(len(lengths), device=lengths.device) * width, lengths)


@dataclass(frozen=True)
class _Bucket:
    """Rows of similar lengths that share one zero-padded grid on the SDPA path."""

    tokens: torch.Tensor  # their packed tokens (queries), row after row
    slots: torch.Tensor  # where those go in the row-major [rows, width] query grid
    rows: int
    width: int
    key_tokens: torch.Tensor  # the packed tokens of their keys: context row, then own, row after row
    key_slots: torch.Tensor
    key_width: int
    mask: torch.Tensor | None  # [rows, 1, width, key_width] when some row has a context; else causal


# Rows share a grid while their key lengths stay within this factor of the bucket's longest, so the
# padded attention costs at most about twice the rows' own (measured: benchmarks/packing.py).
BUCKET_RATIO = 2**0.5


@dataclass
class PackedRows:
    """Rows of `lengths` tokens packed back to back into one sequence (rows may be empty).

    A row attends causally to its own tokens. A row with a context (`contexts[r] >= 0`, the index of
    another row that has none) first attends to all of that row: the responses of a group continue
    their prompt, which is packed, run and differentiated once for the whole group.
    """

    lengths: torch.Tensor  # [R] long, on the model's device
    contexts: torch.Tensor | None = None  # [R] long, -1 for none
    keep: LayerKV | None = None  # when given, every layer's packed keys and values are stored here
    offsets: torch.Tensor = field(init=False)  # [R + 1] int32
    width: int = field(init=False)  # the longest row
    position_ids: torch.Tensor = field(init=False)  # [1, N]: a row counts on from its context's length
    key_lengths: torch.Tensor = field(init=False)  # [R] context + own length
    key_offsets: torch.Tensor = field(init=False)
    key_width: int = field(init=False)
    key_gather: torch.Tensor | None = field(init=False, default=None)  # each row's keys, back to back

    def __post_init__(self) -> None:
        lengths = self.lengths
        self.offsets = _offsets(lengths)
        self.width = max(1, int(lengths.max())) if len(lengths) else 1
        context_lengths = torch.zeros_like(lengths)
        if self.contexts is not None:
            context_lengths = torch.where(self.contexts >= 0, lengths[self.contexts.clamp(min=0)], 0)
        self.position_ids = spans(context_lengths, lengths).unsqueeze(0)
        self.key_lengths = context_lengths + lengths
        self.key_offsets, self.key_width = self.offsets, self.width
        if self.contexts is not None:
            self.key_offsets = _offsets(self.key_lengths)
            self.key_width = max(1, int(self.key_lengths.max()))
            starts = self.offsets[:-1].long()
            self.key_gather = spans(
                torch.stack([starts[self.contexts.clamp(min=0)], starts], 1).view(-1),
                torch.stack([context_lengths, lengths], 1).view(-1),
            )

    @cached_property
    def buckets(self) -> tuple[list[_Bucket], torch.Tensor]:
        """The SDPA path's grids, and the permutation putting their outputs back in packed order."""
        key_lengths = self.key_lengths.tolist()
        order = sorted(range(len(key_lengths)), key=lambda r: -key_lengths[r])
        groups: list[list[int]] = []
        for row in order:
            if not groups or key_lengths[row] * BUCKET_RATIO < key_lengths[groups[-1][0]]:
                groups.append([])
            groups[-1].append(row)
        device = self.lengths.device
        buckets = []
        for group in groups:
            rows = torch.tensor(group, device=device)
            lengths, key_lengths_b = self.lengths[rows], self.key_lengths[rows]
            width, key_width = max(1, int(lengths.max())), max(1, int(key_lengths_b.max()))
            tokens = spans(self.offsets[:-1].long()[rows], lengths)
            key_tokens, mask = tokens, None
            if self.key_gather is not None:
                key_tokens = self.key_gather[spans(self.key_offsets[:-1].long()[rows], key_lengths_b)]
                context = (key_lengths_b - lengths)[:, None, None]
                if bool(context.any()):
                    # Query t of a row sees key columns c <= context + t (later columns are its
                    # future or padding), so no query row is fully masked.
                    columns = torch.arange(key_width, device=device)
                    steps = torch.arange(width, device=device)[:, None]
                    mask = (columns <= context + steps).unsqueeze(1)
            buckets.append(
                _Bucket(
                    tokens=tokens,
                    slots=_grid_slots(lengths, width),
                    rows=len(group),
                    width=width,
                    key_tokens=key_tokens,
                    key_slots=_grid_slots(key_lengths_b, key_width),
                    key_width=key_width,
                    mask=mask,
                )
            )
        inverse = torch.argsort(torch.cat([bucket.tokens for bucket in buckets]))
        return buckets, inverse

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
    ) -> torch.Tensor:
        """Attention of packed `query` `[N, H, d]` over `key`/`value` `[N, Hkv, d]` -> `[N, H, d]`."""
        if self.keep is not None:
            self.keep[layer] = (key, value)
        gqa = query.shape[1] != key.shape[1]
        if varlen_attn is not None and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
            if self.key_gather is not None:
                key, value = key.index_select(0, self.key_gather), value.index_select(0, self.key_gather)
            return varlen_attn(
                query,
                key,
                value,
                self.offsets,
                self.key_offsets,
                self.width,
                self.key_width,
                scale=scale,
                window_size=(-1, 0),  # causal, aligned to each row's last key
                enable_gqa=gqa,
            )
        buckets, inverse = self.buckets
        outputs = []
        for bucket in buckets:
            grid = F.scaled_dot_product_attention(
                _to_grid(query.index_select(0, bucket.tokens), bucket.slots, bucket.rows, bucket.width),
                _to_grid(
                    key.index_select(0, bucket.key_tokens), bucket.key_slots, bucket.rows, bucket.key_width
                ),
                _to_grid(
                    value.index_select(0, bucket.key_tokens), bucket.key_slots, bucket.rows, bucket.key_width
                ),
                attn_mask=bucket.mask,
                is_causal=bucket.mask is None,
                scale=scale,
                enable_gqa=gqa,
            )
            flat = grid.transpose(1, 2).reshape(bucket.rows * bucket.width, grid.shape[1], grid.shape[3])
            outputs.append(flat.index_select(0, bucket.slots))
        return torch.cat(outputs).index_select(0, inverse)


def packed_ids(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids of `rows` back to back `[N]`, and the rows' lengths `[R]`, on `device`."""
    ids = torch.tensor([token for row in rows for token in row], dtype=torch.long, device=device)
    return ids, torch.tensor([len(row) for row in rows], dtype=torch.long, device=device)


# Passed as the attention mask of packed and decoding calls: transformers returns a 4D mask as it is,
# where it would otherwise scan the position ids for packed rows at every forward (a device sync, and
# a CUDA stream-capture query even on CPU; 21 ms of the embedded model's 0.45 s sampling of 16 x 8
# rows). `packed_attention` takes the rows' layout from the call and ignores this.
LAYOUT_IN_CALL = torch.ones(1, 1, 1, 1, dtype=torch.bool)


def forward_packed(model: PreTrainedModel, input_ids: torch.Tensor, rows: PackedRows) -> torch.Tensor:
    """The final states `[N, hidden]` of the model's backbone over packed rows `input_ids` `[N]`."""
    use_packed_attention(model)
    return model.base_model(
        input_ids=input_ids.unsqueeze(0),
        attention_mask=LAYOUT_IN_CALL,
        position_ids=rows.position_ids,
        packed=rows,
        use_cache=False,
    ).last_hidden_state[0]


def _to_grid(tokens: torch.Tensor, slots: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """Packed `[N, heads, d]` -> zero-padded `[rows, heads, width, d]`."""
    grid = tokens.new_zeros(rows * width, *tokens.shape[1:]).index_copy(0, slots, tokens)
    return grid.view(rows, width, *tokens.shape[1:]).transpose(1, 2)


class DecodeCache:
    """Preallocated keys and values of rows being sampled, one new token per row and step.

    Slot s holds its row's tokens left-aligned in `[slots, Hkv, capacity, d]` buffers per layer,
    allocated once at prefill (no per-token reallocation). `drop` moves the rows still sampling into
    the first slots, so finished rows leave the batch, the cache and every later forward.
    """

    def __init__(self, prompts: PackedRows, sources: torch.Tensor, capacity: int) -> None:
        assert prompts.keep is not None
        count = len(sources)
        self.lengths = prompts.lengths[sources]
        tokens = spans(prompts.offsets[:-1].long()[sources], self.lengths)
        slots = _grid_slots(self.lengths, capacity)
        layers = [prompts.keep[layer] for layer in range(len(prompts.keep))]
        self.keys = [_to_grid(key[tokens], slots, count, capacity).contiguous() for key, _ in layers]
        self.values = [_to_grid(value[tokens], slots, count, capacity).contiguous() for _, value in layers]
        self.capacity = capacity
        self.slots = torch.arange(count, device=self.lengths.device)
        self.mask = torch.ones(0, dtype=torch.bool)

    @classmethod
    def prefill(
        cls, model: PreTrainedModel, prompts: list[list[int]], sources: list[int], max_new_tokens: int
    ) -> tuple[DecodeCache, torch.Tensor]:
        """Run the prompts once, packed; slot s of the cache continues prompt `sources[s]` (samples of
        one prompt share its prefill), with room for `max_new_tokens` more. Also returns the states
        `[slots, hidden]` of the prompts' last tokens, which predict the first new ones."""
        input_ids, lengths = packed_ids(prompts, model.device)
        rows = PackedRows(lengths, keep={})
        hidden = forward_packed(model, input_ids, rows)
        source = torch.tensor(sources, device=lengths.device)
        return cls(rows, source, rows.width + max_new_tokens), hidden[rows.offsets[1:].long() - 1][source]

    def step(self, model: PreTrainedModel, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token `[rows]` to every row; returns the new states `[rows, hidden]`."""
        width = int(self.lengths.max()) + 1
        if width > self.capacity:
            raise ValueError(f"the decode cache holds {self.capacity} tokens per row; a row needs {width}")
        # The key columns each row's new token sees: its cached tokens and itself.
        columns = torch.arange(width, device=self.lengths.device)
        self.mask = (columns <= self.lengths[:, None]).view(len(self.lengths), 1, 1, width)
        hidden = model.base_model(
            input_ids=token_ids.unsqueeze(1),
            attention_mask=LAYOUT_IN_CALL,
            position_ids=self.lengths.unsqueeze(1),
            decode=self,
            use_cache=False,
        ).last_hidden_state[:, 0]
        self.lengths += 1
        return hidden

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
    ) -> torch.Tensor:
        """Write each row's new `key`/`value` `[rows, Hkv, 1, d]` after its cached tokens, attend
        `query` `[rows, H, 1, d]` over its row -> `[rows, 1, H, d]`."""
        rows, width = len(self.lengths), self.mask.shape[-1]
        keys, values = self.keys[layer], self.values[layer]
        keys[self.slots[:rows], :, self.lengths] = key[:, :, 0]
        values[self.slots[:rows], :, self.lengths] = value[:, :, 0]
        out = F.scaled_dot_product_attention(
            query,
            keys[:rows, :, :width],
            values[:rows, :, :width],
            attn_mask=self.mask,
            scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2)

    def drop(self, finished: torch.Tensor) -> torch.Tensor:
        """Remove the rows where `finished` `[rows]` is set: the rows still going fill the first slots,
        the last ones moving into the holes (a copy per finished row, not per row). Returns the old slot
        of every new slot."""
        going = torch.nonzero(~finished).squeeze(1)
        count = len(going)
        order = torch.arange(count, device=finished.device)
        holes = torch.nonzero(finished[:count]).squeeze(1)
        movers = going[going >= count]
        if len(holes):
            order[holes] = movers
            width = int(self.lengths.max())
            for buffer in (*self.keys, *self.values):
                buffer[holes, :, :width] = buffer[movers, :, :width]
        self.lengths = self.lengths[order]
        return order


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    packed: PackedRows | None = None,
    decode: DecodeCache | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: `query` `[B, H, S, d]`, `key`/`value` `[B, Hkv, S, d]` ->
    `[B, S, H, d]`; packed rows come as B = 1, decoding as S = 1."""
    if packed is None and decode is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if dropout:
        raise ValueError("packed attention has no dropout; set the model's attention_dropout to 0")
    layer = module.layer_idx
    if decode is not None:
        return decode.attend(layer, query, key, value, scaling), None
    assert packed is not None
    flat = packed.attend(
        layer, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), scaling
    )
    return flat.unsqueeze(0), None


AttentionInterface.register(ATTENTION, packed_attention)
# Plain calls get SDPA's masks; packed and decoding calls pass `LAYOUT_IN_CALL`, which skips them.
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_packed_attention(model: PreTrainedModel) -> None:
    """Select the packed attention for `model` (idempotent)."""
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)

"""Fast decoding of a [`LongNetLM`][dilated.longnet.models.LongNetLM]: static shapes, one CUDA graph per token.

A decoding step of a small batch is launch-bound: each layer runs a few dozen small kernels, and
the host takes longer to launch them than the GPU to run them. The step of
[`LongNetLM.decode_at`][dilated.longnet.models.LongNetLM.decode_at] has static shapes (a
preallocated [`KVCache`][dilated.longnet.kv_cache.KVCache], one token, the position a device
tensor, the branches' key slots computed from it on the device) and never synchronises, so it is
captured once, whole, in a ``torch.cuda.CUDAGraph`` and each token replays it: one launch for
every layer.

Why a hand-captured graph and not ``torch.compile(mode="reduce-overhead")``: the graph replays
exactly the kernels of the eager step, so its tokens are those of eager decoding; capturing takes
one eager step instead of a compilation of the model (tens of seconds, again for every new dtype
or batch); and the step writes the cache in place, which compiled CUDA graphs accept only for
inputs marked as static addresses. ``decode_at`` still compiles whole (``fullgraph=True``) for
whoever wants to fuse it.
"""

from __future__ import annotations

import torch

from dilated.core.base import BaseDilatedAttention
from dilated.core.checks import ArgumentTypeError, check_bool, check_positive_int
from dilated.longnet.kv_cache import KVCache
from dilated.longnet.models import LongNetLM

__all__ = ["StaticDecoder"]


class StaticDecoder:
    """Decode a [`LongNetLM`][dilated.longnet.models.LongNetLM] with a preallocated cache and a
    one-token step of static shapes, replayed from a CUDA graph on CUDA.

    ```python
    decoder = StaticDecoder(model, batch=1, max_length=prompt_len + new_tokens)
    logits = decoder.prefill(prompt)  # (batch, num_tokens), the last prompt position
    for _ in range(new_tokens - 1):
        token = logits.argmax(-1)
        logits = decoder.step(token)  # one graph replay
    ```

    The prompt runs through the model's own attention kind
    ([`forward`][dilated.longnet.models.LongNetLM.forward] with the cache); each
    [`step`][dilated.longnet.static_decoder.StaticDecoder.step] then runs
    [`LongNetLM.decode_at`][dilated.longnet.models.LongNetLM.decode_at] at the next position:
    captured in a CUDA graph at the first step (``cuda_graph=True``, the default on CUDA), or
    eagerly (the fallback on other devices, and ``cuda_graph=False``). A decoder is reused for
    any number of prompts of its batch: [`prefill`][dilated.longnet.static_decoder.StaticDecoder.prefill]
    starts over, the graph stays valid. The model must be in eval mode and its weights must stay
    where they are (the graph reads them in place); decoding runs under ``torch.no_grad``.

    Args:
        model: the language model.
        batch: sequences decoded together.
        max_length: positions the cache holds: prompt plus new tokens.
        cuda_graph: capture the step in a CUDA graph; None (default): on CUDA.

    Raises:
        ValueError / TypeError: naming the argument: a ``model`` that is not a ``LongNetLM``,
            a ``batch`` or ``max_length`` that is not a positive int, ``cuda_graph=True`` on a
            model that is not on CUDA, a model whose attention computes another function than
            dilated attention (a block-sparse layout: no cache reproduces it).
    """

    def __init__(
        self, model: LongNetLM, batch: int, max_length: int, *, cuda_graph: bool | None = None
    ) -> None:
        if not isinstance(model, LongNetLM):
            raise ArgumentTypeError(f"model must be a LongNetLM, got {type(model).__name__}")
        check_positive_int("batch", batch)
        check_positive_int("max_length", max_length)
        device = model.embedding.weight.device
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        elif check_bool("cuda_graph", cuda_graph) and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on CUDA, this one is on {device}")
        for attention in model.modules():
            if isinstance(attention, BaseDilatedAttention) and not (
                attention.computes_dilated_attention
            ):
                raise ValueError(
                    f"model's attention ({type(attention).__name__}) computes another function "
                    "than dilated attention (e.g. a block-sparse layout), which no KV cache "
                    "reproduces: decode it without a cache"
                )
        self.model = model
        self.cuda_graph = cuda_graph
        self.cache: KVCache = model.new_cache(batch, max_length)
        self._tokens = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self._position = torch.zeros((), dtype=torch.int64, device=device)
        self._logits: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None

    @property
    def batch(self) -> int:
        """Sequences decoded together."""
        return self._tokens.shape[0]

    @property
    def max_length(self) -> int:
        """Positions the cache holds."""
        return self.cache.layers[0].capacity

    @property
    def length(self) -> int:
        """Positions written so far (prompt and decoded tokens)."""
        return self.cache.length

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start over with a prompt: fill the cache and return the logits of its last position.

        Args:
            input_ids: int64 ``(batch, prompt)``, ``1 <= prompt <= max_length``, ids in
                ``[0, num_tokens)`` (checked as [`forward`][dilated.longnet.models.LongNetLM.forward]
                checks them by default: on CPU always, on CUDA when ``DILATED_CHECK_FINITE``
                asks for value checks).

        Returns:
            float ``(batch, num_tokens)``.

        Raises:
            ValueError / TypeError: ``input_ids`` that is not ``(batch, >= 1)`` integer ids of
                this decoder's batch, ids out of range, a prompt longer than ``max_length``; a
                model in training mode.
        """
        model = self.model
        if model.training:
            raise ValueError(
                "model is in training mode (dropout would differ per step): call model.eval() "
                "before decoding"
            )
        model._check_ids(input_ids, check_range=False)  # the ids: by forward, as it does
        b, n = input_ids.shape
        if b != self.batch:
            raise ValueError(
                f"input_ids has batch {b} but the decoder was made for batch {self.batch}: "
                f"create a StaticDecoder(model, batch={b}, ...)"
            )
        if n > self.max_length:
            raise ValueError(
                f"input_ids holds {n} tokens but the decoder's max_length is {self.max_length}: "
                "create it with a larger max_length"
            )
        self.cache.length = 0
        logits: torch.Tensor = model(input_ids, cache=self.cache)[:, -1]
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per sequence and return the logits that follow it.

        Args:
            tokens: int64 ``(batch,)`` or ``(batch, 1)`` on the model's device, ids in
                ``[0, num_tokens)`` (not checked: they usually come from the logits).

        Returns:
            float ``(batch, num_tokens)``: with a CUDA graph, the graph's output buffer, which
            the next step overwrites (``clone()`` it to keep it).

        Raises:
            ValueError / TypeError: ``step`` before [`prefill`][dilated.longnet.static_decoder.StaticDecoder.prefill],
                a full cache (naming ``max_length``), ``tokens`` of another shape than
                ``(batch,)``/``(batch, 1)`` or not integer.
        """
        if self.cache.length == 0:
            raise ValueError("call prefill(input_ids) before step(): the cache is empty")
        if self.cache.length >= self.max_length:
            raise ValueError(
                f"the cache is full: max_length={self.max_length} positions are written; "
                "create the StaticDecoder with a larger max_length"
            )
        if not isinstance(tokens, torch.Tensor):
            raise ArgumentTypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        b = self.batch
        if tokens.dtype not in (torch.int32, torch.int64) or tuple(tokens.shape) not in (
            (b,),
            (b, 1),
        ):
            raise ValueError(
                f"tokens must be integer ids of shape (batch,) or (batch, 1) with batch {b}, "
                f"got {tokens.dtype} {tuple(tokens.shape)}"
            )
        self._tokens.copy_(tokens.reshape(b, 1))
        self._position.fill_(self.cache.length)
        if not self.cuda_graph:
            logits = self.model.decode_at(self._tokens, self.cache, self._position)
        else:
            if self._graph is None:
                self._capture()
            assert self._graph is not None and self._logits is not None
            self._graph.replay()
            logits = self._logits
        self.cache.length += 1
        return logits[:, -1]

    def _capture(self) -> None:
        # Warm-up on a side stream first (as torch.cuda.graphs recommends): lazy initialisation
        # (cuBLAS handles, the branches' slot tables) must not happen inside the capture. It
        # writes the keys of this very step at this position, which the replay writes again.
        model, side = self.model, torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model.decode_at(self._tokens, self.cache, self._position)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = model.decode_at(self._tokens, self.cache, self._position)
        self._graph = graph

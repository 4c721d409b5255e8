"""Autoregressive generation for [`LongNetLM`][dilated.longnet.models.LongNetLM], with or without a KV cache."""

from __future__ import annotations

import math

import torch

from dilated.core.checks import ArgumentTypeError, check_bool
from dilated.longnet.models import LongNetLM
from dilated.longnet.static_decoder import StaticDecoder

__all__ = ["generate"]


def _pick(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    # Shifted by the row maximum before dividing: every scaled logit is then <= 0 and the
    # maxima exactly 0 (kept 0 where a temperature below float32's range would make 0 / 0), so
    # a tiny temperature (1e-45) sends the others to -inf instead of overflowing into
    # inf - inf = NaN: the draw tends to greedy (the argmax, or one of exactly tied maxima).
    shifted = logits.float() - logits.float().amax(dim=-1, keepdim=True)
    scaled = torch.where(shifted == 0, 0.0, shifted / temperature)
    if top_k is not None:
        kth = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _on_cuda(model: LongNetLM) -> bool:
    return model.embedding.weight.device.type == "cuda"


@torch.no_grad()
def generate(
    model: LongNetLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    use_cache: bool = True,
    fast: bool | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``input_ids`` by ``max_new_tokens`` tokens.

    With ``use_cache`` the prompt runs once through the model's attention kind and fills a
    [`KVCache`][dilated.longnet.kv_cache.KVCache]; each new token then reads, per layer and branch, at most
    ``w / r`` cached keys of its own segment, so its cost does not grow with the tokens before it.
    Without the cache every step recomputes the whole sequence. Greedy decoding gives the same
    tokens either way (up to floating-point ties).

    ``fast=True`` decodes through a [`StaticDecoder`][dilated.longnet.static_decoder.StaticDecoder]:
    the same cache preallocated once and a one-token step of static shapes, replayed from a CUDA
    graph on CUDA (captured once per call: hold a ``StaticDecoder`` to reuse it across calls),
    run eagerly elsewhere. It computes what ``use_cache=True`` computes. The default (``None``)
    takes it for a model on CUDA, where an eager step is bound by its kernel launches (on an H100,
    after a 16K prompt, 4 layers of d 1024: 7.3 ms a token eager, 1.4 ms replayed).

    Args:
        model: the language model (put in eval mode for the duration).
        input_ids: int64 ``(batch, prompt)``, ``prompt >= 1``.
        max_new_tokens: tokens to add (>= 0).
        temperature: 0 for greedy; otherwise sample from ``softmax(logits / temperature)``,
            computed stably for any finite positive value: as the temperature tends to 0 the
            draw tends to greedy, and a tiny one (``1e-45``) picks the most likely token (a
            uniform choice among exactly tied ones).
        top_k: sample only among the ``top_k`` most likely tokens.
        use_cache: incremental decoding with a KV cache.
        fast: decode with static shapes, a CUDA graph on CUDA (needs ``use_cache``); None:
            when ``use_cache`` and the model is on CUDA.
        generator: random generator for sampling.

    Returns:
        int64 ``(batch, prompt + max_new_tokens)``.

    Raises:
        ValueError / TypeError: naming the argument: a prompt that is not ``(batch, >= 1)``
            integer ids in ``[0, num_tokens)``, a negative or non-int ``max_new_tokens``, a
            negative or non-finite ``temperature``, a ``top_k`` that is not a positive int
            (``True`` included), a non-bool ``use_cache``, a ``fast`` that is neither a bool nor
            None, ``fast`` without ``use_cache``, a ``generator`` that is not a
            ``torch.Generator``.
    """
    if not isinstance(model, LongNetLM):
        raise ArgumentTypeError(f"model must be a LongNetLM, got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor):
        raise ArgumentTypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (batch, prompt >= 1), got {tuple(input_ids.shape)}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    check_bool("use_cache", use_cache)
    if fast is None:
        fast = use_cache and _on_cuda(model)
    elif check_bool("fast", fast) and not use_cache:
        raise ValueError("fast=True decodes through the KV cache: it needs use_cache=True")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    model._check_ids(input_ids, check_range=True)  # the prompt; sampled ids are in range
    was_training = model.training
    model.eval()
    try:
        seq = input_ids
        if max_new_tokens == 0:
            return seq
        if use_cache:
            b, length = seq.shape[0], seq.shape[1] + max_new_tokens
            if fast:
                decoder = StaticDecoder(model, b, length)
                logits = decoder.prefill(seq)
            else:
                cache = model.new_cache(b, length)
                logits = model(seq, cache=cache, check_ids=False)[:, -1]
            for step in range(max_new_tokens):
                nxt = _pick(logits, temperature, top_k, generator)
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                if step + 1 < max_new_tokens and fast:
                    logits = decoder.step(nxt)
                elif step + 1 < max_new_tokens:
                    logits = model(nxt[:, None], cache=cache, check_ids=False)[:, -1]
        else:
            for _ in range(max_new_tokens):
                nxt = _pick(model(seq, check_ids=False)[:, -1], temperature, top_k, generator)
                seq = torch.cat([seq, nxt[:, None]], dim=1)
        return seq
    finally:
        model.train(was_training)

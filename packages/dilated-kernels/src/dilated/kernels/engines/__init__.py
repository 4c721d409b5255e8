"""The dense engines: every dense attention kernel of the project, reached through one registry.

Every dilated computation is a set of dense attention problems over strided views (one per
branch, phase and run of segments) merged by their log-sum-exp; the shared sub-problem primitive
([`subproblem_attention`][dilated.kernels.subproblem.subproblem_attention]) runs each of them on
one of these engines, for every backend of dilated-kernels, the ring and all-gather strategies,
dilated-sparse and the KV cache alike.

| engine | kernel | per-shape cost | runs |
|---|---|---|---|
| ``"flash4"`` | flash-attn-4 (CuTe DSL), extra ``dilated-kernels[flash]`` | none (one compile per configuration) | CUDA SM80+ forward, SM90+ backward; float16/bfloat16; GQA, causal |
| ``"cudnn"`` | cuDNN fused attention (PyTorch) | a plan per new shape (tens of ms) | CUDA float16/bfloat16; GQA, causal, key mask, dropout |
| ``"sdpa_flash"`` | PyTorch's FlashAttention-2 | none | CUDA SM80+ float16/bfloat16; GQA, causal |
| ``"reference"`` | plain PyTorch (dilated-core) | none | everything, everywhere (materialises the scores) |

Adding an engine is one module with the [`Engine`][dilated.kernels.engines.spec.Engine]
attributes and one entry in ``_MODULES``; every package and test reads the list from here.
"""

from __future__ import annotations

import warnings

import torch

from dilated.core.caching import PlanCache
from dilated.core.settings import get_settings
from dilated.kernels.engines import cudnn, flash4, reference, sdpa_flash
from dilated.kernels.engines.spec import Engine, SubproblemSpec

__all__ = [
    "CUDNN_PLAN_AFTER",
    "ENGINES",
    "ENGINE_NAMES",
    "SMALL_CALL_WORK",
    "Engine",
    "SubproblemSpec",
    "available_engines",
    "choose_engine",
    "get_engine",
    "supporting_engines",
]

_MODULES: tuple[Engine, ...] = (flash4, cudnn, sdpa_flash, reference)

#: Every engine by name, in the order ``"auto"`` prefers them.
ENGINES: dict[str, Engine] = {m.NAME: m for m in _MODULES}

#: Every name ``engine=`` accepts, ``"auto"`` included.
ENGINE_NAMES: tuple[str, ...] = ("auto", *ENGINES)

#: ``"auto"`` sends a call cuDNN would have to plan for (a shape it has not run) to an engine
#: without per-shape plans until that shape has been seen this many times: a shape that repeats
#: (training, a fixed-size benchmark) pays one plan and then runs on cuDNN; one that does not
#: (decoding, evaluation at many lengths) never waits for a plan.
CUDNN_PLAN_AFTER = 2

#: ``"auto"`` sends a call of at most this much work (batch x rows_q x rows_k x heads x
#: head_dim) to ``"sdpa_flash"`` when it takes it and the engine it would go to has a heavy host
#: path (``HEAVY_HOST_PATH``: flash-attn-4; not cuDNN, whose host path is C++ like PyTorch's
#: flash kernels' and whose GPU work is faster) (setting ``small_calls_on_sdpa_flash``). At
#: such sizes the host, not the GPU, sets the time: flash-attn-4's Python wrapper costs about
#: 0.2 ms per forward and 0.6 ms per backward call on an H100 host (2026-12-05), PyTorch's
#: flash kernels tens of microseconds. Its GPU work is slower, though (about half of
#: flash-attn-4's speed on an H100), so the rule pays only where host time dominates. On an H100
#: (2026-12-05, 16 heads of 128, default branches, eager) it made a 4K-token sequence 1.3-1.7x
#: faster forward and forward+backward; at 8K and 16K it was mixed (16K non-causal
#: forward+backward 1.4x slower, the causal rows faster), so 2**34 takes every call of a
#: 4K-token sequence and none of an 8K one. Under a CUDA graph (no host cost) flash-attn-4 is
#: faster at every size: turn the setting off there.
SMALL_CALL_WORK = 1 << 34

_supporting: PlanCache[SubproblemSpec, tuple[Engine, ...]] = PlanCache(
    "dilated.kernels.engines.supporting_engines", maxsize=4096, key="the call's SubproblemSpec"
)
#: How many times ``"auto"`` has seen each shape that cuDNN would plan for.
_seen_shapes: PlanCache[tuple[object, ...], int] = PlanCache(
    "dilated.kernels.engines.seen_shapes",
    maxsize=4096,
    key="(SubproblemSpec, q shape, q strides, k shape, k strides, v strides)",
)
_warned: set[str] = set()


def get_engine(name: str) -> Engine:
    """The engine called ``name``; ``ValueError`` naming the valid ones otherwise."""
    if not isinstance(name, str) or name not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_NAMES)}, got {name!r}")
    return ENGINES[name]


def available_engines(device: torch.device | str | None = None) -> list[str]:
    """Names of the engines usable on ``device`` (default: CUDA when available, else CPU), in
    the order ``"auto"`` prefers them."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return [name for name, m in ENGINES.items() if m.available(dev)]


def supporting_engines(spec: SubproblemSpec) -> tuple[Engine, ...]:
    """The engines that can run a call of ``spec``, in order of preference (cached per spec;
    ``"reference"`` is always last)."""
    found = _supporting.get(spec)
    if found is None:
        found = tuple(m for m in _MODULES if m.unsupported_reason(spec) is None)
        _supporting.put(spec, found)
        _explain_skips(spec, found[0])
    return found


def _explain_skips(spec: SubproblemSpec, chosen: Engine) -> None:
    """Warn once per reason when the engine ``"auto"`` prefers on this device cannot take a call
    (flash-attn-4 and dropout, say), so that a slower path is never silent."""
    if torch.compiler.is_compiling():
        return
    device = torch.device(spec.device_type, spec.device_index)
    preferred = next((m for m in _MODULES if not m.FALLBACK and m.available(device)), None)
    if preferred is None or preferred is chosen:
        return
    reason = preferred.unsupported_reason(spec)
    if reason is None or reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(
        f"dilated sub-problems run on the {chosen.NAME!r} engine instead of {preferred.NAME!r} "
        f"for this call: {reason}",
        stacklevel=5,
    )


def _plan_key(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: SubproblemSpec
) -> tuple[object, ...]:
    return (spec, q.shape, q.stride(), k.shape, k.stride(), v.stride())


def choose_engine(
    spec: SubproblemSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    engine: str = "auto",
) -> Engine:
    """The engine that runs this call.

    ``engine="auto"``: the first engine in ``ENGINES`` order that takes the call, except that a
    small call (at most ``SMALL_CALL_WORK``) that would go to an engine with a heavy host path
    (flash-attn-4) goes to ``"sdpa_flash"`` when it takes it (its host cost is the lowest;
    setting ``small_calls_on_sdpa_flash``), a shape cuDNN has not yet run
    ``CUDNN_PLAN_AFTER`` times goes to the next engine without per-shape plans when one takes
    it (never to ``"reference"``), and a CUDA-graph capture never triggers a new cuDNN plan.
    The choice does not depend on whether a capture is under way otherwise, so a warm-up call
    has compiled whatever the captured one runs. A named engine runs every call it supports;
    the others (an empty or odd-shaped piece) take the ``"auto"`` choice, which computes the
    same function.
    """
    candidates = supporting_engines(spec)
    if engine != "auto":
        named = get_engine(engine)
        if named in candidates:
            return named
    best = candidates[0]
    if (
        best.HEAVY_HOST_PATH
        and sdpa_flash in candidates
        and q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2] * spec.head_dim <= SMALL_CALL_WORK
        and get_settings().small_calls_on_sdpa_flash
    ):
        return sdpa_flash
    if not best.PLANS_PER_SHAPE:
        return best
    alternative = next(
        (m for m in candidates[1:] if not m.PLANS_PER_SHAPE and not m.FALLBACK), None
    )
    if alternative is None:
        return best
    key = _plan_key(q, k, v, spec)
    seen = _seen_shapes.get(key) or 0
    if seen >= CUDNN_PLAN_AFTER:
        return best  # counted enough: no write on the steady path
    if seen + 1 == CUDNN_PLAN_AFTER and torch.cuda.is_current_stream_capturing():
        return alternative  # the plan is built at the next call outside a capture
    _seen_shapes.put(key, seen + 1)
    return best if seen + 1 >= CUDNN_PLAN_AFTER else alternative

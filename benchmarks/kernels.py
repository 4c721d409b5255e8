"""Benchmark of dilated-kernels against the reference, "ideal" and FlexAttention (one GPU).

Every row is one (seq, feature, causal, mode, method):

* feature: ``mha`` (as many kv heads as query heads), ``gqa4`` / ``gqa2`` (grouped-query
  attention with 4 / 2 kv heads; 16 query heads by default), ``pad`` (a key padding mask with the
  last 1/8 of the keys of each sequence padded) or ``dropout`` (``dropout_p=0.1``);
* causal: ``off`` / ``on``; mode: ``fwd`` or ``fwd+bwd``;
* method: the dilated-core reference path (up to ``--reference-max-seq``), "ideal", FlexAttention
  with a mask_mod for the pattern (``mha`` only, up to ``--flex-max-seq``), or a backend of
  dilated-kernels ("cudnn": cuDNN per sub-problem + fused Triton merge; "triton": the fused
  kernel; "sdpa"; "auto"...), called with the feature's kv heads, key padding mask and dropout.

"ideal" is torch SDPA over the sub-problems already gathered into contiguous tensors (same
FLOPs, no gather and no merge), with the same feature: k/v of the gathered parts with the
feature's kv heads (``enable_gqa``), a boolean ``attn_mask`` hiding the gathered keys whose
original position is in the padded tail (combined with the causal triangle into one mask, since
SDPA takes no mask together with ``is_causal=True``), and the same ``dropout_p``. It is timed
under each of the SDPA backends cuDNN, Flash and memory-efficient separately
(``--ideal-backends``; a backend that cannot run the call is skipped, saying why) and the fastest
is kept; the row says which (``ideal_backend``).

Prints median times (triton.testing.do_bench), TFLOP/s counted as
``4 * heads * sum_i(seq * (w_i / r_i) * head_dim / r_i)`` forward (x3.5 for forward+backward,
halved for causal) with ``heads`` the query heads, for every feature: grouped-query attention
does the work of MHA, and the padded rows are counted unpadded (as if no key were masked). Then
peak memory above the inputs and ``ideal/this`` (1.0: as fast as the ideal), a Markdown table
at the end, and the rows as JSON (``--json``). A method that fails is printed and recorded as
NaN, one out of memory as inf; neither stops the run.

``--lm-step`` times instead one training step (forward, cross-entropy on the shifted tokens,
backward, AdamW) of a ``LongNetLM`` with the model's defaults apart from its size (4 layers,
d_model 1024, 16 heads, 32K tokens, vocabulary 32000, bf16): its default ``attention_type``
against each of ``--lm-attention``; peak memory there is the whole allocation (parameters,
optimizer state, activations).

    python benchmarks/kernels.py --seqs 65536 262144 1048576 --features mha gqa4 gqa2 pad dropout --causal-modes off on --methods ideal cudnn --json kernels_features.json
    python benchmarks/kernels.py --lm-step --json lm_step.json
    python benchmarks/kernels.py --seqs 32768 262144 --json kernels.json
    python benchmarks/kernels.py --seqs 4194304 --methods cudnn --modes fwd
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
import timeit
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import torch
import torch.nn.functional as F

from dilated.core.functional import dilated_attention as core_attention
from dilated.kernels import dilated_attention


@dataclass(frozen=True)
class Feature:
    """What a row adds to plain multi-head attention.

    Attributes:
        name: the ``--features`` name.
        kv_heads: key/value heads (grouped-query attention); None: as many as the query heads.
        pad_fraction: the fraction of the keys at the end of each sequence that are padding.
        dropout_p: dropout on the attention probabilities.
    """

    name: str
    kv_heads: int | None = None
    pad_fraction: float = 0.0
    dropout_p: float = 0.0


FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature("mha"),
        Feature("gqa4", kv_heads=4),
        Feature("gqa2", kv_heads=2),
        Feature("pad", pad_fraction=1 / 8),
        Feature("dropout", dropout_p=0.1),
    )
}
CAUSAL_MODES = {"off": False, "on": True}
#: The kernels the ideal is timed under, each alone: names of torch.nn.attention.SDPBackend, and
#: "FA4" (flash-attn-4's ``flash_attn_func``, for the features it has: no padding or dropout).
IDEAL_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "FA4")


def kv_heads_for(feature: Feature, heads: int) -> int:
    """The kv heads of ``feature`` with ``heads`` query heads; ValueError unless they divide it."""
    kv = heads if feature.kv_heads is None else feature.kv_heads
    if kv < 1 or kv > heads or heads % kv:
        raise ValueError(
            f"feature {feature.name!r} needs heads ({heads}) to be a multiple of its kv heads ({kv})"
        )
    return kv


def padded_keys(seq: int, fraction: float) -> int:
    """How many keys at the end of a sequence of ``seq`` tokens are padding."""
    return int(seq * fraction)


def key_padding_mask(
    batch: int, seq: int, fraction: float, device: torch.device | str
) -> torch.Tensor | None:
    """Bool ``(batch, seq)``, True at padding (PyTorch's convention), the last ``fraction``
    padded; None for 0."""
    if fraction == 0:
        return None
    mask = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    mask[:, seq - padded_keys(seq, fraction) :] = True
    return mask


def ideal_attn_mask(
    batch: int,
    seq: int,
    w: int,
    r: int,
    fraction: float,
    causal: bool,
    device: torch.device | str,
) -> torch.Tensor | None:
    """SDPA ``attn_mask`` (True: attend) of the gathered sub-problems of branch ``(w, r)``.

    Row ``i`` of segment ``s`` is the token at ``s * w + p + r * i``; the ideal times phase
    ``p = 0`` only (the timing is the same for every phase). A key is hidden when that position is
    in the padded tail of the sequence.

    Returns:
        None without padding; else bool ``(batch * (seq // w), 1, 1, w // r)``, or
        ``(batch * (seq // w), 1, w // r, w // r)`` with the causal triangle folded in when
        ``causal`` (SDPA takes no ``attn_mask`` together with ``is_causal=True``).
    """
    if fraction == 0:
        return None
    rows, segments = w // r, seq // w
    pos = (
        torch.arange(segments, device=device)[:, None] * w
        + r * torch.arange(rows, device=device)[None, :]
    )
    real = (pos < seq - padded_keys(seq, fraction)).repeat(batch, 1)  # batch-major, as the parts
    mask = real[:, None, None, :]
    if causal:
        mask = mask & torch.ones(rows, rows, dtype=torch.bool, device=device).tril()
    return mask


def ideal_sdpa_kwargs(
    feature: Feature, heads: int, kv_heads: int, causal: bool, mask: torch.Tensor | None
) -> dict[str, Any]:
    """Keywords of the ideal's ``scaled_dot_product_attention`` calls for ``feature``."""
    kwargs: dict[str, Any] = {"dropout_p": feature.dropout_p}
    if mask is None:
        kwargs["is_causal"] = causal
    else:
        kwargs["attn_mask"] = mask
    if kv_heads < heads:
        kwargs["enable_gqa"] = True
    return kwargs


def ours_kwargs(
    feature: Feature, batch: int, seq: int, causal: bool, device: torch.device | str
) -> dict[str, Any]:
    """Keywords of ``dilated_attention`` (and of the reference) for ``feature``."""
    return {
        "is_causal": causal,
        "key_padding_mask": key_padding_mask(batch, seq, feature.pad_fraction, device),
        "dropout_p": feature.dropout_p,
    }


def flops(
    seq: int, heads: int, d: int, ws: Sequence[int], rs: Sequence[int], causal: bool
) -> float:
    """Forward FLOPs of dilated attention with ``heads`` query heads, padding counted unpadded."""
    f = sum(4 * heads * seq * (w / r) * d / r for w, r in zip(ws, rs))
    return f / 2 if causal else f


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` when both are finite and the denominator positive, else NaN."""
    if math.isfinite(numerator) and math.isfinite(denominator) and denominator > 0:
        return numerator / denominator
    return math.nan


@dataclass
class Measured:
    """One method's result: median ms and peak GiB (NaN: failed, inf: out of memory)."""

    ms: float = math.nan
    peak_gib: float = math.nan
    backend: str = ""
    note: str = ""


def measure(fn: Callable[[], object]) -> Measured:
    """Median ms and peak GiB above what was allocated before ``fn``; inf on out-of-memory.

    Any other exception propagates (the caller records it).
    """
    import triton.testing  # imported here so that the pure helpers import without triton

    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")
        return Measured(float(ms), peak)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return Measured(math.inf, math.inf, note="out of memory")


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"


@dataclass(frozen=True)
class Case:
    """The problem of one row, all methods alike."""

    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    segments: tuple[int, ...]
    rates: tuple[int, ...]
    feature: Feature
    causal: bool
    grad: bool
    dtype: torch.dtype
    device: str = "cuda"
    ideal_backends: tuple[str, ...] = IDEAL_BACKENDS


def ideal_inputs(case: Case) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per branch, contiguous q ``(b * (seq // w), heads, w // r, d)`` and k, v with kv heads."""
    parts = []
    for w, r in zip(case.segments, case.rates):
        n, rows = case.batch * (case.seq // w), w // r

        def rand(h: int, n: int = n, rows: int = rows) -> torch.Tensor:
            return torch.randn(
                n,
                h,
                rows,
                case.head_dim,
                device=case.device,
                dtype=case.dtype,
                requires_grad=case.grad,
            )

        parts.append((rand(case.heads), rand(case.kv_heads), rand(case.kv_heads)))
    return parts


def measure_ideal(case: Case) -> Measured:
    """The fastest of the SDPA backends on the gathered sub-problems (see the module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    parts = ideal_inputs(case)
    calls = []
    for (w, r), qkv in zip(zip(case.segments, case.rates), parts):
        mask = ideal_attn_mask(
            case.batch, case.seq, w, r, case.feature.pad_fraction, case.causal, case.device
        )
        calls.append(
            (qkv, ideal_sdpa_kwargs(case.feature, case.heads, case.kv_heads, case.causal, mask))
        )
    leaves = [x for p in parts for x in p]
    best = Measured(note="no SDPA backend ran")
    for name in case.ideal_backends:
        if name == "FA4":
            run = fa4_ideal_runner(case, parts)
            if run is None:
                continue
        else:
            backend = getattr(SDPBackend, name)

            def run(backend: SDPBackend = backend) -> None:
                with sdpa_kernel(backend):
                    outs = [F.scaled_dot_product_attention(*qkv, **kw) for qkv, kw in calls]
                    if case.grad:
                        torch.autograd.grad(outs, leaves, [o.detach() for o in outs])

        with warnings.catch_warnings(record=True) as why:  # a backend that cannot run warns why
            warnings.simplefilter("always")
            try:
                got = measure(run)
            except Exception as exc:  # a backend that cannot run the call is skipped
                said = dict.fromkeys(str(w.message).split(" (Triggered")[0] for w in why)
                reason = " ".join(said)[:200] if said else short(exc)
                print(f"    ideal under {name} skipped: {reason}", flush=True)
                continue
            finally:
                torch.cuda.empty_cache()
        if not best.ms <= got.ms:  # NaN (none yet) or slower
            best = Measured(got.ms, got.peak_gib, backend=name, note=got.note)
    return best


def fa4_ideal_runner(
    case: Case, parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> Callable[[], None] | None:
    """flash-attn-4 over the gathered sub-problems (read as ``(n, rows, heads, d)`` views), or
    None (printed why) where it is not installed or the feature is one it lacks."""
    from dilated.kernels.engines import flash4

    if not flash4.available(torch.device(case.device)):
        print("    ideal under FA4 skipped: flash-attn-4 is not installed", flush=True)
        return None
    if case.feature.pad_fraction or case.feature.dropout_p:
        print(f"    ideal under FA4 skipped: no {case.feature.name} in flash-attn-4", flush=True)
        return None
    from flash_attn.cute import flash_attn_func

    views = [tuple(x.transpose(1, 2) for x in qkv) for qkv in parts]
    leaves = [x for p in parts for x in p]

    def run() -> None:
        outs = [flash_attn_func(*qkv, causal=case.causal)[0] for qkv in views]
        if case.grad:
            torch.autograd.grad(outs, leaves, [o.detach() for o in outs])

    return run


def ours_runner(method: str, case: Case) -> Callable[[], None]:
    """``method`` (a dilated-kernels backend, or "reference") on fresh ``(b, seq, h, d)`` inputs."""
    b, seq, d = case.batch, case.seq, case.head_dim

    def rand(h: int) -> torch.Tensor:
        return torch.randn(
            b, seq, h, d, device=case.device, dtype=case.dtype, requires_grad=case.grad
        )

    q, k, v = rand(case.heads), rand(case.kv_heads), rand(case.kv_heads)
    dout = torch.randn_like(q) if case.grad else None
    kwargs = ours_kwargs(case.feature, b, seq, case.causal, case.device)
    ws, rs = list(case.segments), list(case.rates)

    def run() -> None:
        if method == "reference":
            o = core_attention(q, k, v, ws, rs, check_finite=False, **kwargs)
        else:
            o = dilated_attention(q, k, v, ws, rs, backend=method, check_finite=False, **kwargs)
        if case.grad:
            torch.autograd.grad(o, (q, k, v), dout)

    return run


def flex_runner(case: Case) -> Callable[[], None]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, seq, h, d = case.batch, case.seq, case.heads, case.head_dim
    ws, rs, causal = case.segments, case.rates, case.causal
    wt = torch.tensor(ws, device="cuda")
    rt = torch.tensor(rs, device="cuda")

    def mask_mod(bi, hi, qi, ki):  # type: ignore[no-untyped-def]
        ok = torch.zeros_like(qi, dtype=torch.bool)
        for i in range(len(ws)):
            w, r = wt[i], rt[i]
            p = hi % r
            m = (qi // w == ki // w) & (qi % r == p) & (ki % r == p)
            ok = ok | m
        if causal:
            ok = ok & (ki <= qi)
        return ok

    # A mask cannot count a key twice, so this is the union pattern (one softmax over the set
    # union, not the multiset): the timing is comparable, the values slightly differ.
    # _compile builds the block mask blockwise instead of from a dense seq x seq mask.
    block = create_block_mask(mask_mod, b, h, seq, seq, device="cuda", _compile=True)
    fn = torch.compile(flex_attention)
    q, k, v = (
        torch.randn(b, h, seq, d, device="cuda", dtype=case.dtype, requires_grad=case.grad)
        for _ in range(3)
    )
    dout = torch.randn_like(q) if case.grad else None

    def run() -> None:
        o = fn(q, k, v, block_mask=block)
        if case.grad:
            torch.autograd.grad(o, (q, k, v), dout)

    return run


def skip_reason(method: str, case: Case, args: argparse.Namespace) -> str:
    """Why ``method`` is not run for ``case`` ("" when it is)."""
    if method == "reference" and case.seq > args.reference_max_seq:
        return f"reference only up to --reference-max-seq {args.reference_max_seq}"
    if method == "flex":
        if case.feature.name != "mha":
            return "flex: mha only"
        if case.seq > args.flex_max_seq:
            return f"flex only up to --flex-max-seq {args.flex_max_seq}"
    return ""


def run_method(method: str, case: Case, args: argparse.Namespace) -> Measured:
    """One method on one case; a failure is printed and returned as NaN, never raised."""
    reason = skip_reason(method, case, args)
    if reason:
        return Measured(note=reason)
    try:
        if method == "ideal":
            return measure_ideal(case)
        run = flex_runner(case) if method == "flex" else ours_runner(method, case)
        return measure(run)
    except torch.cuda.OutOfMemoryError:
        return Measured(math.inf, math.inf, note="out of memory")
    except Exception as exc:  # a failing method is reported, not fatal
        note = short(exc)
        print(f"  {method} failed: {note}", flush=True)
        return Measured(note=note)
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def causal_name(causal: bool) -> str:
    return "on" if causal else "off"


def kernel_rows(
    args: argparse.Namespace, device: str = "cuda", dtype: torch.dtype = torch.bfloat16
) -> list[dict[str, Any]]:
    """Every (seq, feature, causal, mode, method) row of ``args``, printed as it is measured."""
    h, d = args.heads, args.head_dim
    ws, rs = tuple(args.segments), tuple(args.rates)
    rows = []
    start = time.perf_counter()
    for seq in args.seqs:
        for feature in (FEATURES[name] for name in args.features):
            for causal in (CAUSAL_MODES[c] for c in args.causal_modes):
                fl = flops(seq, h, d, ws, rs, causal)
                for mode in args.modes:
                    case = Case(
                        batch=1,
                        seq=seq,
                        heads=h,
                        kv_heads=kv_heads_for(feature, h),
                        head_dim=d,
                        segments=ws,
                        rates=rs,
                        feature=feature,
                        causal=causal,
                        grad=mode == "fwd+bwd",
                        dtype=dtype,
                        device=device,
                        ideal_backends=tuple(args.ideal_backends),
                    )
                    res = {method: run_method(method, case, args) for method in args.methods}
                    ideal = res.get("ideal", Measured())
                    total_flops = fl * (3.5 if case.grad else 1.0)
                    for method, got in res.items():
                        row = {
                            "seq": seq,
                            "feature": feature.name,
                            "causal": causal,
                            "mode": mode,
                            "method": method,
                            "heads": h,
                            "kv_heads": case.kv_heads,
                            "ms": got.ms,
                            "peak_gib": got.peak_gib,
                            "tflops": ratio(total_flops, got.ms * 1e-3) / 1e12,
                            "ideal_ms": ideal.ms,
                            "ideal_backend": ideal.backend,
                            "vs_ideal": ratio(ideal.ms, got.ms),
                            "note": got.note,
                            "elapsed_s": round(time.perf_counter() - start, 1),
                        }
                        rows.append(row)
                        print(row_line(row), flush=True)
    return rows


def row_line(r: dict[str, Any]) -> str:
    """One row as the line printed while the benchmark runs."""
    won = f" [{r['ideal_backend']}]" if r["method"] == "ideal" and r["ideal_backend"] else ""
    note = f"  ({r['note']})" if r["note"] and not math.isfinite(r["ms"]) else ""
    return (
        f"seq={r['seq']:>8} {r['feature']:>7} causal={causal_name(r['causal']):<3} "
        f"{r['mode']:>7} {r['method']:>9}: {r['ms']:9.2f} ms {r['tflops']:7.1f} TFLOP/s "
        f"peak {r['peak_gib']:6.2f} GiB  ideal/this {r['vs_ideal']:.2f}{won}  "
        f"t={r['elapsed_s']:.0f}s{note}"
    )


def kernel_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| seq | feature | causal | mode | method | ms | ideal ms (backend) | ideal/this | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        backend = short_backend(r["ideal_backend"])
        ideal = f"{r['ideal_ms']:.2f}" + (f" ({backend})" if backend else "")
        lines.append(
            f"| {r['seq']:,} | {r['feature']} | {causal_name(r['causal'])} | {r['mode']} | "
            f"{r['method']} | {r['ms']:.2f} | {ideal} | {r['vs_ideal']:.2f} | {r['peak_gib']:.2f} |"
        )
    return "\n".join(lines)


def short_backend(name: str) -> str:
    """``"CUDNN_ATTENTION"`` -> ``"cudnn"``."""
    return name.removesuffix("_ATTENTION").lower()


@dataclass(frozen=True)
class LMShape:
    """Size of the LongNetLM of ``--lm-step`` (keywords of ``LongNetLM`` but ``seq``, the tokens
    of the step); everything else is the model's default."""

    num_tokens: int = 32000
    d_model: int = 1024
    nhead: int = 16
    num_decoder_layers: int = 4
    segment_lengths: tuple[int, ...] = (2048, 4096, 8192)
    dilation_rates: tuple[int, ...] = (1, 2, 4)
    seq: int = 32768


def lm_step(
    attention_type: str | None,
    shape: LMShape,
    *,
    device: str,
    dtype: torch.dtype,
    warmup: int,
    rep_ms: float,
) -> dict[str, Any]:
    """Median ms per training step and peak GiB of a LongNetLM (``attention_type`` None: default).

    A step: forward on ``1 x shape.seq`` random ids, cross-entropy of the logits against the next
    token (float32), backward, AdamW. After ``warmup`` steps: the peak memory of one step (all
    that is allocated: parameters, optimizer state, activations) and the median of
    ``triton.testing.do_bench`` over about ``rep_ms`` milliseconds of steps, as for the kernel
    rows (on CUDA; off CUDA, a wall-clock median of 3 steps and no memory).
    """
    from dilated.longnet import LongNetLM

    kwargs: dict[str, Any] = {} if attention_type is None else {"attention_type": attention_type}
    sizes = {name: value for name, value in asdict(shape).items() if name != "seq"}
    model = LongNetLM(**sizes, **kwargs, device=device, dtype=dtype)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, shape.num_tokens, (1, shape.seq), device=device)
    cuda = device.startswith("cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if cuda:
        import triton.testing

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
        ms = float(triton.testing.do_bench(step, warmup=0, rep=rep_ms, return_mode="median"))
    else:  # a smoke run off CUDA
        peak = math.nan
        ms = statistics.median(timeit.repeat(step, number=1, repeat=3)) * 1e3
    return {
        "attention_type": model.config.attention_type,
        "default": attention_type is None,
        "implementation": type(model.layers[0].self_attn).__name__,
        "ms": ms,
        "peak_gib": peak,
    }


def lm_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    shape = LMShape(
        num_tokens=args.lm_vocab,
        d_model=args.lm_d_model,
        nhead=args.lm_heads,
        num_decoder_layers=args.lm_layers,
        segment_lengths=tuple(args.segments),
        dilation_rates=tuple(args.rates),
        seq=args.lm_seq,
    )
    rows: list[dict[str, Any]] = []
    for attention_type in [None, *args.lm_attention]:
        label = "default" if attention_type is None else attention_type
        if attention_type is not None and any(
            r["default"] and r["attention_type"] == attention_type for r in rows
        ):
            continue  # the default itself, already measured
        try:
            row = lm_step(
                attention_type,
                shape,
                device="cuda",
                dtype=torch.bfloat16,
                warmup=args.lm_warmup,
                rep_ms=args.lm_rep_ms,
            )
            row["note"] = ""
        except torch.cuda.OutOfMemoryError:
            row = lm_failed(attention_type, math.inf, "out of memory")
        except Exception as exc:  # a failing variant is reported, not fatal
            row = lm_failed(attention_type, math.nan, short(exc))
            print(f"  lm step {label} failed: {row['note']}", flush=True)
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        row.update(seq=shape.seq, d_model=shape.d_model, layers=shape.num_decoder_layers)
        rows.append(row)
        print(
            f"lm step {label:>10} ({row['attention_type']}, {row['implementation']}): "
            f"{row['ms']:8.1f} ms/step, peak {row['peak_gib']:6.2f} GiB",
            flush=True,
        )
    return rows


def lm_failed(attention_type: str | None, value: float, note: str) -> dict[str, Any]:
    return {
        "attention_type": "default" if attention_type is None else attention_type,
        "default": attention_type is None,
        "implementation": "",
        "ms": value,
        "peak_gib": value,
        "note": note,
    }


def lm_table(rows: Sequence[dict[str, Any]]) -> str:
    """The LongNetLM step rows as a Markdown table, with speed and memory against the default."""
    base = next((r for r in rows if r["default"]), None)
    lines = [
        "| attention_type | implementation | ms/step | peak GiB | default speed / this | this memory / default |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["attention_type"] + (" (default)" if r["default"] else "")
        speed = ratio(base["ms"], r["ms"]) if base else math.nan
        memory = ratio(r["peak_gib"], base["peak_gib"]) if base else math.nan
        lines.append(
            f"| {name} | {r['implementation']} | {r['ms']:.1f} | {r['peak_gib']:.2f} | "
            f"{speed:.2f} | {memory:.2f} |"
        )
    return "\n".join(lines)


#: First calls per row of --new-lengths, at lengths never run before in the process.
NEW_LENGTH_CALLS = 5


def fresh_lengths(seq: int, step: int, used: set[int], count: int = NEW_LENGTH_CALLS) -> list[int]:
    """``count`` lengths above ``seq + 8`` (the warm-up's), multiples of 8 (the engines'
    alignment), whose remainders modulo ``step`` (the segments' lcm) are in ``used`` by no
    earlier row: a partial last segment of a size already run would reuse a planned shape."""
    lengths: list[int] = []
    extra = 136
    while len(lengths) < count:
        length = seq + extra
        if length % step not in used:
            used.add(length % step)
            lengths.append(length)
        extra += 8
    return lengths


def new_length_runner(
    method: str, engine: str, seq: int, args: argparse.Namespace, grad: bool
) -> Callable[[], None]:
    """One call of the op (``method="op"``, sub-problems on ``engine``) or of the ring at a world
    of one (``method="ring"``, engine "auto") on fresh bf16 inputs of ``seq`` tokens."""
    from dilated.kernels.backends import cudnn as subproblem_backend

    h, d = args.heads, args.head_dim
    q, k, v = (
        torch.randn(1, seq, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        for _ in range(3)
    )
    ws, rs = list(args.segments), list(args.rates)
    scale = d**-0.5
    causal = CAUSAL_MODES[args.causal_modes[0]]

    def run() -> None:
        if method == "ring":
            from dilated.ring import ring_dilated_attention

            out = ring_dilated_attention(q, k, v, ws, rs, is_causal=causal)
            assert isinstance(out, torch.Tensor)
        else:
            out, _ = subproblem_backend.forward(
                q, k, v, ws, rs, scale=scale, is_causal=causal, key_padding_mask=None,
                dropout_p=0.0, engine=engine,
            )  # fmt: skip
        if grad:
            torch.autograd.grad(out, (q, k, v), out.detach())

    return run


def first_call_ms(run: Callable[[], None]) -> float:
    """Wall-clock ms of one call, host and device (synchronised before and after)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def new_length_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per (seq, method, engine, mode): the steady median and the first calls at new lengths."""
    import triton.testing

    from dilated.kernels.engines import available_engines

    here = available_engines("cuda")
    rows = []
    used_tails: set[int] = {0, 8}
    step = math.lcm(*args.segments)
    combos = [("op", e) for e in args.engines] + [("ring", "auto")]
    for seq in args.seqs:
        for method, engine in combos:
            if engine != "auto" and engine not in here:
                print(f"{method} on {engine}: skipped, not available on this GPU", flush=True)
                continue
            for mode in args.modes:
                grad = mode == "fwd+bwd"
                try:
                    for warm in (seq, seq + 8):
                        used_tails.add(warm % step)
                        first_call_ms(new_length_runner(method, engine, warm, args, grad))
                    steady = triton.testing.do_bench(
                        new_length_runner(method, engine, seq, args, grad),
                        warmup=5, rep=40, return_mode="median",
                    )  # fmt: skip
                    firsts = [
                        first_call_ms(new_length_runner(method, engine, length, args, grad))
                        for length in fresh_lengths(seq, step, used_tails)
                    ]
                except Exception as exc:  # a failing combination is reported, not fatal
                    print(f"{method} on {engine} {mode} at {seq}: {short(exc)}", flush=True)
                    continue
                first = statistics.median(firsts)
                target = max(2 * steady, steady + 2.0)
                row = {
                    "seq": seq,
                    "method": method,
                    "engine": engine,
                    "mode": mode,
                    "causal": args.causal_modes[0],
                    "steady_ms": steady,
                    "first_ms_median": first,
                    "first_ms_max": max(firsts),
                    "first_over_steady": first / steady,
                    "target_met": first <= target,
                }
                print(new_length_line(row), flush=True)
                rows.append(row)
    return rows


def new_length_line(r: dict[str, Any]) -> str:
    return (
        f"{r['seq']:>8} {r['method']:>4} {r['engine']:>10} {r['mode']:>7}: steady "
        f"{r['steady_ms']:8.2f} ms, first at a new length {r['first_ms_median']:8.2f} ms "
        f"(max {r['first_ms_max']:.2f}, x{r['first_over_steady']:.2f}) "
        f"{'ok' if r['target_met'] else 'OVER'}"
    )


def new_length_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| seq | call | engine | mode | steady ms | first call at a new length ms (median, max) "
        "| first / steady | <= max(2x, +2 ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seq']} | {r['method']} | {r['engine']} | {r['mode']} | {r['steady_ms']:.2f} | "
            f"{r['first_ms_median']:.2f}, {r['first_ms_max']:.2f} | "
            f"{r['first_over_steady']:.2f} | {'yes' if r['target_met'] else 'no'} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 262144])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--segments", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--rates", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--features", nargs="+", choices=list(FEATURES), default=["mha"])
    ap.add_argument("--causal", action="store_true", help="the same as --causal-modes on")
    ap.add_argument(
        "--causal-modes",
        nargs="+",
        choices=list(CAUSAL_MODES),
        default=None,
        help="off, on or both (default: off, or on with --causal)",
    )
    ap.add_argument(
        "--ideal-backends",
        nargs="+",
        choices=[short_backend(name) for name in IDEAL_BACKENDS],
        default=[short_backend(name) for name in IDEAL_BACKENDS],
        help="the SDPA backends the ideal is timed under (the fastest is kept)",
    )
    ap.add_argument("--flex-max-seq", type=int, default=32768)
    ap.add_argument("--reference-max-seq", type=int, default=32768)
    ap.add_argument(
        "--methods", nargs="+", default=["reference", "ideal", "flex", "cudnn", "triton"]
    )
    ap.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    ap.add_argument("--json", default=None, help="write every row here")
    ap.add_argument(
        "--new-lengths",
        action="store_true",
        help="time the first call at lengths not seen before against the steady call, for each "
        "of --engines (the op) and the ring at a world of one, instead of the kernel rows",
    )
    ap.add_argument(
        "--engines",
        nargs="+",
        default=["auto", "flash4", "cudnn", "sdpa_flash"],
        help="dense engines of the sub-problems for --new-lengths",
    )
    ap.add_argument(
        "--lm-step",
        action="store_true",
        help="time a LongNetLM training step instead of the kernel rows",
    )
    ap.add_argument(
        "--lm-attention",
        nargs="*",
        default=["standard"],
        help="attention_type values to compare with the model's default (default: standard)",
    )
    ap.add_argument("--lm-seq", type=int, default=32768)
    ap.add_argument("--lm-d-model", type=int, default=1024)
    ap.add_argument("--lm-heads", type=int, default=16)
    ap.add_argument("--lm-layers", type=int, default=4)
    ap.add_argument("--lm-vocab", type=int, default=32000)
    ap.add_argument("--lm-warmup", type=int, default=2)
    ap.add_argument(
        "--lm-rep-ms", type=float, default=3000, help="milliseconds of timed steps per variant"
    )
    args = ap.parse_args(argv)
    if args.causal_modes is None:
        args.causal_modes = ["on"] if args.causal else ["off"]
    elif args.causal and "on" not in args.causal_modes:
        ap.error("--causal contradicts --causal-modes without 'on'")
    full_names = {short_backend(name): name for name in IDEAL_BACKENDS}
    args.ideal_backends = [full_names[name] for name in args.ideal_backends]
    if len(args.segments) != len(args.rates):
        ap.error("--segments and --rates need as many values each")
    for name in args.features:
        try:
            kv_heads_for(FEATURES[name], args.heads)
        except ValueError as exc:
            ap.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py measures CUDA kernels; no CUDA device here, nothing measured")
        return
    import triton

    if args.lm_step:
        rows = lm_rows(args)
        print("\n" + lm_table(rows))
    elif args.new_lengths:
        rows = new_length_rows(args)
        print("\n" + new_length_table(rows))
    else:
        rows = kernel_rows(args)
        print("\n" + kernel_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "triton": triton.__version__,
                    "date": datetime.now().isoformat(),
                    "shape": {
                        "batch": 1,
                        "heads": args.heads,
                        "head_dim": args.head_dim,
                        "segments": args.segments,
                        "rates": args.rates,
                        "dtype": "bfloat16",
                    },
                    "kind": "lm-step"
                    if args.lm_step
                    else "new-lengths"
                    if args.new_lengths
                    else "kernels",
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()

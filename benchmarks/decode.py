"""Decoding and Hugging Face models on one GPU, each row against its baseline in the same run.

Parts (``--parts``; all by default), bf16, batch 1, random weights, median times:

* ``lm``: ``LongNetLM`` (``--layers`` 4, ``--d-model`` 1024, ``--heads`` 16, vocabulary 32000,
  the model's default branches) after a ``--prompt`` (16K) prompt: prefill ms, ms per token and
  tok/s of cached greedy decoding, ``eager`` (``model(token, cache=cache)``, what
  ``generate(use_cache=True)`` runs) and ``fast`` (``StaticDecoder``: the step replayed from a
  CUDA graph, what ``generate(fast=True)`` runs). Baseline: eager. Target (issue 21): >= 200
  tok/s.
* ``hf-generate``: a transformers Llama of the same size (``intermediate_size`` 4 x d_model, as
  many key/value heads as heads) ``generate``s ``--new-tokens`` (64) greedy tokens after the
  prompt, ``attn_implementation="dilated"`` (branches of the default preset) against ``"sdpa"``,
  with a ``DynamicCache`` and a static cache (``cache_implementation="static"``; on CUDA
  transformers compiles its decoding step). Prefill ms is ``generate(max_new_tokens=1)``; ms per
  token is ``(generate(new) - prefill) / (new - 1)``. Baseline: sdpa with the same cache. Target:
  dilated at least as fast, prefill and per token.
* ``hf-train``: one training step (forward, loss, backward, AdamW) of that Llama at
  ``--train-seqs`` tokens (8K, 32K, 128K), dilated against sdpa; ``speedup`` is sdpa's time over
  dilated's. Targets: >= 1.0x at 8K, >= 1.6x at 32K, >= 4x at 128K.

Prints a Markdown table per part and writes every row as JSON (``--json``). A row that fails is
printed and recorded with its error; none stops the run. ``--quick`` runs tiny sizes on the CPU in
seconds (a smoke test of the script, not a measurement).

    python benchmarks/decode.py --json decode.json
    python benchmarks/decode.py --parts lm --json lm-decode.json
    python benchmarks/decode.py --quick
    python benchmarks/decode.py --parts lm --profile-eager   # where an eager step's time goes
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import torch

from dilated.core.presets import DEFAULT_PRESET, PRESETS
from dilated.longnet import LongNetLM, StaticDecoder

PARTS = ("lm", "hf-generate", "hf-train")
CACHES = ("dynamic", "static")
IMPLS = ("dilated", "sdpa")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(run: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``run()`` in ms, the device synchronised around each call."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def ratio(numerator: float, denominator: float) -> float:
    ok = math.isfinite(numerator) and math.isfinite(denominator) and denominator > 0
    return numerator / denominator if ok else math.nan


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(what: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``make()``'s row, or a row holding the error (out of memory named as such)."""
    try:
        return make()
    except torch.OutOfMemoryError:
        print(f"{what}: out of memory")
        return {"error": "out of memory"}
    except Exception as exc:  # a failing row is reported, the others still run
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------- LongNetLM decoding


def lm_rows(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = LongNetLM(
        num_tokens=args.vocab, d_model=args.d_model, nhead=args.heads,
        num_decoder_layers=args.layers, dim_feedforward=4 * args.d_model, dropout=0.0,
        device=device, dtype=dtype, **branches(args),
    ).eval()  # fmt: skip
    prompt = torch.randint(0, args.vocab, (1, args.prompt), device=device)
    n, length = args.new_tokens, args.prompt + args.new_tokens
    rows = []

    def eager() -> dict[str, Any]:
        cache = model.new_cache(1, length)

        def prefill() -> torch.Tensor:
            cache.length = 0
            logits: torch.Tensor = model(prompt, cache=cache)[:, -1]
            return logits

        steps: list[float] = []
        with torch.no_grad():
            prefill_ms = median_ms(prefill, device, args.repeats)
            for _ in range(args.repeats + 1):  # the first warms up
                logits = prefill()
                sync(device)
                start = time.perf_counter()
                for _ in range(n):
                    logits = model(logits.argmax(-1, keepdim=True), cache=cache)[:, -1]
                sync(device)
                steps.append((time.perf_counter() - start) * 1e3 / n)
            if args.profile_eager:
                token = prefill().argmax(-1, keepdim=True)  # the cache holds n more tokens
                profile_steps(lambda: model(token, cache=cache), device, min(8, n))
        return {"prefill_ms": prefill_ms, "ms_per_token": statistics.median(steps[1:])}

    def fast() -> dict[str, Any]:
        decoder = StaticDecoder(model, 1, length)
        steps: list[float] = []
        prefill_ms = median_ms(lambda: decoder.prefill(prompt), device, args.repeats)
        for _ in range(args.repeats + 1):  # the first captures the graph
            logits = decoder.prefill(prompt)
            sync(device)
            start = time.perf_counter()
            for _ in range(n):
                logits = decoder.step(logits.argmax(-1))
            sync(device)
            steps.append((time.perf_counter() - start) * 1e3 / n)
        return {"prefill_ms": prefill_ms, "ms_per_token": statistics.median(steps[1:])}

    for mode, measure in (("eager", eager), ("fast", fast)):
        row = {"part": "lm", "mode": mode, "prompt": args.prompt, "new_tokens": n}
        row |= guarded(f"lm {mode}", measure)
        row["tok_per_s"] = ratio(1e3, row.get("ms_per_token", math.nan))
        rows.append(row)
        release(device)
    base = rows[0].get("ms_per_token", math.nan)
    for row in rows:
        row["baseline"] = "eager"
        row["speedup"] = ratio(base, row.get("ms_per_token", math.nan))
        row["target_200_tok_per_s"] = bool(row["tok_per_s"] >= 200)
    return rows


def profile_steps(step: Callable[[], Any], device: torch.device, steps: int = 8) -> None:
    """Print where the host and the device spend an eager decoding step (``torch.profiler``,
    the ops with the most CPU time of their own): what a CUDA graph would remove."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    print(f"\neager decoding, {steps} steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


def branches(args: argparse.Namespace) -> dict[str, list[int]]:
    if args.quick:
        return {"segment_lengths": [16, 32], "dilation_rates": [1, 2]}
    preset = PRESETS[DEFAULT_PRESET]
    return {
        "segment_lengths": list(preset.segment_lengths),
        "dilation_rates": list(preset.dilation_rates),
    }


# --------------------------------------------------------------------------- Hugging Face Llama


def llama(args: argparse.Namespace, impl: str, device: torch.device, dtype: torch.dtype) -> Any:
    import transformers

    import dilated.longnet.hf as dhf

    config = transformers.LlamaConfig(
        hidden_size=args.d_model, intermediate_size=4 * args.d_model,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.prompt + args.new_tokens, *args.train_seqs),
    )  # fmt: skip
    if impl == "dilated":
        b = branches(args)
        dhf.configure(config, b["segment_lengths"], b["dilation_rates"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    return model.to(device=device, dtype=dtype)


def measure_generate(
    model: Any, prompt: torch.Tensor, cache: str, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """Prefill ms and ms per token of ``model.generate`` with a ``cache`` cache."""
    kw: dict[str, Any] = {"do_sample": False, "pad_token_id": 0}
    if cache == "static":
        kw["cache_implementation"] = "static"

    def generate(new: int) -> None:
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kw)

    with torch.no_grad():
        # The longest first: a static cache is sized for it and then reused, and transformers
        # compiles its decoding step in the warm-up.
        for _ in range(2):
            generate(args.new_tokens)
        prefill = median_ms(lambda: generate(1), device, args.repeats)
        full = median_ms(lambda: generate(args.new_tokens), device, args.repeats)
    return {"prefill_ms": prefill, "ms_per_token": ratio(full - prefill, args.new_tokens - 1)}


def generate_rows(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> list[dict[str, Any]]:
    prompt = torch.randint(0, args.vocab, (1, args.prompt), device=device)
    rows = []
    for impl in IMPLS:
        model = llama(args, impl, device, dtype).eval()
        for cache in args.caches:
            row: dict[str, Any] = {"part": "hf-generate", "impl": impl, "cache": cache}
            row["prompt"], row["new_tokens"] = args.prompt, args.new_tokens
            row |= guarded(
                f"generate {impl} {cache}",
                functools.partial(measure_generate, model, prompt, cache, args, device),
            )
            rows.append(row)
            print(row, flush=True)
        del model
        release(device)
    for row in rows:
        base = next(r for r in rows if r["impl"] == "sdpa" and r["cache"] == row["cache"])
        row["baseline"] = f"sdpa {row['cache']}"
        for key in ("prefill_ms", "ms_per_token"):
            row[f"{key}_vs_sdpa"] = ratio(base.get(key, math.nan), row.get(key, math.nan))
    return rows


def measure_train(
    args: argparse.Namespace, impl: str, seq: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """Median ms of one training step (forward, loss, backward, AdamW) and the peak memory."""
    model = llama(args, impl, device, dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (1, seq), device=device)

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = median_ms(step, device, args.repeats, warmup=2)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return {"ms": ms, "peak_gib": peak}


def train_rows(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> list[dict[str, Any]]:
    rows = []
    for seq in args.train_seqs:
        for impl in IMPLS:
            row: dict[str, Any] = {"part": "hf-train", "impl": impl, "seq": seq}
            row |= guarded(
                f"train {impl} {seq}",
                functools.partial(measure_train, args, impl, seq, device, dtype),
            )
            rows.append(row)
            print(row, flush=True)
            release(device)
    for row in rows:
        base = next(r for r in rows if r["impl"] == "sdpa" and r["seq"] == row["seq"])
        row["baseline"] = "sdpa"
        row["speedup"] = ratio(base.get("ms", math.nan), row.get("ms", math.nan))
    return rows


# --------------------------------------------------------------------------- output


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return (
            "nan" if not math.isfinite(value) else f"{value:.3g}" if value < 100 else f"{value:.0f}"
        )
    return str(value)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt(row.get(c, "error" if "error" in row else "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLUMNS = {
    "lm": ("mode", "prompt", "prefill_ms", "ms_per_token", "tok_per_s", "speedup"),
    "hf-generate": (
        "impl",
        "cache",
        "prefill_ms",
        "ms_per_token",
        "prefill_ms_vs_sdpa",
        "ms_per_token_vs_sdpa",
    ),
    "hf-train": ("impl", "seq", "ms", "speedup", "peak_gib"),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--prompt", type=int, default=16384)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--train-seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--caches",
        nargs="+",
        choices=CACHES,
        default=list(CACHES),
        help="hf-generate's caches (static: transformers compiles its step first, minutes)",
    )
    ap.add_argument("--json", default=None, help="write every row here")
    ap.add_argument(
        "--profile-eager",
        action="store_true",
        help="after the lm eager rows, print a torch.profiler table of a few eager steps",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes on the CPU, float32, in seconds: a smoke test of the script",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.prompt, args.new_tokens, args.train_seqs = 40, 6, [48, 96]
        args.layers, args.d_model, args.heads, args.vocab, args.repeats = 2, 32, 4, 64, 2
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (the per-token time is a difference)")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    parts = {"lm": lm_rows, "hf-generate": generate_rows, "hf-train": train_rows}
    rows: list[dict[str, Any]] = []
    for part in args.parts:
        got = parts[part](args, device, dtype)
        print(f"\n{part} ({device}, {dtype})\n" + table(got, COLUMNS[part]) + "\n", flush=True)
        rows += got
    if args.json:
        meta = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__,
            "args": vars(args),
        }
        try:
            import transformers

            meta["transformers"] = transformers.__version__
        except ImportError:
            pass
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

"""Train a small byte-level LongNetLM on CPU and plot its loss curve.

Corpus: the Python language reference as shipped with CPython itself (``pydoc_data.topics``,
~465 KB of English prose and grammar, PSF licence), so nothing is downloaded at run time.
The last 10% of the text is held out.

    uv run python examples/train_lm.py --steps 300 --batch 8

The loss curve goes to ``--plot PATH`` (a ``.png``). Without it, each run writes into a folder
of its own, ``runs/<UTC date-time>/train_loss.png`` under the current directory, which git
ignores; a run never overwrites a tracked file unless asked to. The docs' figure is redrawn with

    uv run python examples/train_lm.py --steps 300 --batch 8 --plot docs/figures/longnet_train_loss.png
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from dilated.longnet import LongNetConfig, LongNetLM, generate


def load_corpus() -> bytes:
    """The language-reference help topics of the running Python, joined, as UTF-8 bytes."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def default_plot_path(now: float | None = None) -> Path:
    """``runs/<UTC date-time>/train_loss.png``: a fresh folder per run, ignored by git."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return Path("runs") / stamp / "train_loss.png"


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq + 1`` bytes, int64 ``(batch, seq + 1)``."""
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + seq + 1] for s in starts.tolist()])


def progress(step: int, total: int, loss: float, started: float) -> None:
    """A one-line progress bar on stderr."""
    width = 30
    done = int(width * step / total)
    rate = step / max(time.perf_counter() - started, 1e-9)
    eta = (total - step) / max(rate, 1e-9)
    bar = "#" * done + "." * (width - done)
    sys.stderr.write(f"\r[{bar}] {step}/{total} loss {loss:.3f} {rate:.1f} it/s eta {eta:.0f}s ")
    sys.stderr.flush()


@torch.no_grad()
def held_out_loss(model: LongNetLM, data: torch.Tensor, seq: int, batches_: int) -> float:
    """Mean loss over ``batches_`` fixed, non-overlapping windows of the held-out bytes."""
    model.eval()
    n = min(batches_ * 8, (data.numel() - 1) // (seq + 1))
    windows = data[: n * (seq + 1)].view(n, seq + 1)
    losses = [model.loss(windows[i : i + 8]).item() for i in range(0, n, 8)]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="where to write the loss curve (.png); default runs/<UTC date-time>/train_loss.png",
    )
    args = parser.parse_args()
    if args.plot is None:
        args.plot = default_plot_path()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
    elif not args.plot.parent.is_dir():  # before the run, not after minutes of training
        parser.error(f"--plot: the folder '{args.plot.parent}' does not exist")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    raw = torch.frombuffer(bytearray(load_corpus()), dtype=torch.uint8).long()
    split = int(0.9 * raw.numel())
    train, held = raw[:split], raw[split:]
    config = LongNetConfig(
        num_tokens=256,
        d_model=128,
        nhead=4,
        num_encoder_layers=0,
        num_decoder_layers=2,
        dim_feedforward=512,
        segment_lengths=(64, 128, 256),
        dilation_rates=(1, 2, 4),
        dropout=0.0,
        attention_type="standard",
    )
    model = LongNetLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"corpus {raw.numel():,} bytes (train {train.numel():,}, held-out {held.numel():,})")
    print(f"model {params:,} parameters; {config}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / args.steps))),
    )
    gen = torch.Generator().manual_seed(args.seed)
    train_curve: list[tuple[int, float]] = []
    held_curve: list[tuple[int, float]] = [(0, held_out_loss(model, held, args.seq, 4))]
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = model.loss(batches(train, args.batch, args.seq, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        train_curve.append((step, loss.item()))
        progress(step, args.steps, loss.item(), started)
        if step % args.eval_every == 0 or step == args.steps:
            held_curve.append((step, held_out_loss(model, held, args.seq, 4)))
    elapsed = time.perf_counter() - started
    sys.stderr.write("\n")
    final = held_curve[-1][1]
    print(f"trained {args.steps} steps in {elapsed:.0f} s")
    print(
        f"held-out loss {held_curve[0][1]:.3f} -> {final:.3f} nats/byte ({final / math.log(2):.2f} bits/byte)"
    )

    prompt = torch.tensor([list(b'The "while" statement')])
    # fast=True: the static-shape decoding step (a CUDA graph on a GPU, eager here); the same
    # tokens as the plain cached path.
    out = generate(model, prompt, 120, fast=True)
    print("greedy sample:", bytes(out[0].tolist()).decode("utf-8", errors="replace"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train_curve), lw=0.8, alpha=0.6, label="train (per batch)")
    ax.plot(*zip(*held_curve), "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(f"LongNetLM {params / 1e6:.2f}M params, byte-level, Python language reference")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()

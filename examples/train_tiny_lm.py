"""Train a tiny causal language model whose attention is ringattn's
MultiheadDilatedAttention, on a long-range recall task -- in one process, or
as a ring of processes under torchrun (gloo, CPU: no MPI, no GPU).

    python examples/train_tiny_lm.py                                   # one process
    torchrun --nproc_per_node 2 examples/train_tiny_lm.py              # two ranks, each half the sequence

The task: every sequence starts with a key token (one of --keys), followed by
noise tokens; at each of the last --recall positions the model must name the
key, seq_len - recall or more positions back.  Tokens carry no position
embedding: the dilated pattern itself (a local branch of --segment tokens and
one spanning the whole sequence at --rate) is what reaches the key.  The loss
is the cross-entropy at the recall positions; guessing among the keys gives
log(keys), so a loss below that means the model recalls.

Under torchrun each rank holds its shard of the sequence (seq_len / ranks
tokens of every sequence) and of the activations; the attention's ring moves
keys and values between ranks through torch.distributed.  The loss is the
mean over all ranks' recall positions, and the parameter gradients are
summed over the ranks (one all_reduce per step), so every rank takes the
same optimiser step as the one-process run: the two runs' losses agree to
float32 rounding.  --losses FILE writes the per-step losses (JSON).
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringattn.torch as rt


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=32, help="model width")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--segment", type=int, default=128, help="the local branch's segment length")
    p.add_argument("--rate", type=int, default=4, help="the dilation rate of the branch spanning the sequence")
    p.add_argument("--keys", type=int, default=4, help="how many distinct key tokens")
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--recall", type=int, default=64, help="positions at the end that must name the key")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--losses", help="write the per-step losses to this JSON file (rank 0)")
    p.add_argument("--every", type=int, default=10, help="progress line every N steps")
    return p.parse_args(argv)


class Block(torch.nn.Module):
    """Pre-norm transformer block: dilated attention, then an MLP."""

    def __init__(self, args, process_group):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(args.dim)
        self.attn = rt.MultiheadDilatedAttention(args.dim, args.heads, [args.segment, args.seq_len], [1, args.rate],
                                                 causal=True, mode="longnet", process_group=process_group)
        self.ln2 = torch.nn.LayerNorm(args.dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(args.dim, 4 * args.dim), torch.nn.GELU(),
                                       torch.nn.Linear(4 * args.dim, args.dim))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(torch.nn.Module):
    def __init__(self, args, process_group=None):
        super().__init__()
        self.embed = torch.nn.Embedding(args.vocab, args.dim)
        self.blocks = torch.nn.ModuleList(Block(args, process_group) for _ in range(args.layers))
        self.norm = torch.nn.LayerNorm(args.dim)
        self.head = torch.nn.Linear(args.dim, args.vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batch(args, step):
    """(tokens, targets) of the full sequences of one step; the same on every
    rank and in every run.  targets is -1 where there is no loss."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    key = torch.randint(0, args.keys, (args.batch,), generator=gen)
    tokens = torch.randint(args.keys, args.vocab, (args.batch, args.seq_len), generator=gen)
    tokens[:, 0] = key
    targets = torch.full_like(tokens, -1)
    targets[:, -args.recall:] = key[:, None]
    return tokens, targets


class Progress:
    """A plain-text progress line: step, loss, tokens per second."""

    def __init__(self, total, tokens_per_step, every):
        self.total, self.tokens, self.every = total, tokens_per_step, every
        self.start = time.perf_counter()
        self.tty = sys.stdout.isatty()

    def update(self, step, loss):
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.start
        done = int(20 * step / self.total)
        line = (f"[{'#' * done}{'.' * (20 - done)}] step {step}/{self.total}  loss {loss:.4f}  "
                f"{self.tokens * step / elapsed:,.0f} tok/s  {elapsed:.1f}s")
        end = "\n" if not self.tty or step == self.total else ""
        sys.stdout.write(("\r" if self.tty else "") + line + end)
        sys.stdout.flush()


def main(argv=None):
    args = parse_args(argv)
    distributed = "RANK" in os.environ  # started by torchrun
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if args.seq_len % world:
        raise SystemExit(f"--seq-len {args.seq_len} is not divisible by the {world} ranks")
    local = args.seq_len // world
    mine = slice(rank * local, (rank + 1) * local)  # this rank's shard of every sequence

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = TinyLM(args, dist.group.WORLD if distributed else None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    n_targets = args.batch * args.recall
    progress = Progress(args.steps, args.batch * args.seq_len, args.every) if rank == 0 else None
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"tiny LM: {args.layers} layers, width {args.dim}, {args.heads} heads, {params:,} parameters; "
              f"{args.batch} x {args.seq_len} tokens per step on {world} rank{'s' if world > 1 else ''} "
              f"({local} each); guessing the key gives loss {math.log(args.keys):.4f}", flush=True)

    losses = []
    for step in range(1, args.steps + 1):
        tokens, targets = batch(args, step)
        logits = model(tokens[:, mine])
        # this rank's share of the mean over every recall position of the batch
        part = F.cross_entropy(logits.flatten(0, 1), targets[:, mine].flatten(), ignore_index=-1,
                               reduction="sum") / n_targets
        opt.zero_grad(set_to_none=False)
        part.backward()
        loss = part.detach().clone()
        if distributed:
            for p in model.parameters():  # every rank's share of the gradient: summed
                dist.all_reduce(p.grad)
            dist.all_reduce(loss)
        opt.step()
        losses.append(float(loss))
        if progress:
            progress.update(step, losses[-1])

    if rank == 0:
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        print(f"loss {first:.4f} (first 5 steps) -> {last:.4f} (last 5)", flush=True)
        if args.losses:
            with open(args.losses, "w") as f:
                json.dump({"world_size": world, "losses": losses}, f)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""A parameter budget over every axis: which mixes of MLP, heads, hidden, depth and vocabulary
cuts land on it, and how to choose among them (Minitron's search, on one machine).

Counting a mix must be instant, because hundreds are enumerated: `Costs` reads, once, what
each unit of each axis holds in the real model (a query head with its `o_proj` columns, a
KV group, an MLP neuron, a block, a residual channel, a vocabulary row), split into the part
that scales with the hidden width and the part that does not. `estimate()` is exact for
one-hidden-dim-per-tensor families (Llama: tests check it against the pruned model's own
count); the stage reports the real count of the mix it applies. The ranking itself (a short
distillation run per candidate) is the caller's: `search()` takes it as a function.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

from engine.errors import MinigptError

MLP_LEVELS = tuple(round(0.05 * i, 2) for i in range(16))  # 0 .. 0.75 of the neurons
HIDDEN_LEVELS = tuple(round(0.0625 * i, 4) for i in range(9))  # 0 .. 0.5 of the channels
DEPTH_SHARE = 0.34  # at most a third of the blocks
BALANCED = 4  # candidates are spread over the 4 x n most balanced feasible mixes


@dataclass(frozen=True)
class Mix:
    """One candidate: the share of MLP neurons, of query heads and of hidden channels removed,
    blocks dropped, and whether the vocabulary is cut (to the keep rule's size)."""

    mlp: float = 0.0
    heads: float = 0.0
    hidden: float = 0.0
    depth: int = 0
    vocab: bool = False

    def label(self) -> str:
        parts = [f"mlp {self.mlp:.0%}", f"heads {self.heads:.0%}", f"hidden {self.hidden:.1%}",
                 f"depth {self.depth}", "vocab" if self.vocab else "no vocab"]
        return ", ".join(parts)

    def prune_keys(self) -> dict:
        """The per-axis `[prune]` keys that apply this mix."""
        return {"rule": "ratio", "ratio": self.mlp, "head_ratio": self.heads, "hidden_ratio": self.hidden,
                "depth": self.depth, "embedding_threshold": 0.0 if self.vocab else -1.0}


@dataclass
class Costs:
    """Parameters per unit of each axis, in the unpruned model. `*_h` parts scale with the
    hidden width; the others (biases of q/k/v and of the MLP's input projections) do not."""

    hidden: int
    vocab_rows: int  # embedding rows now
    vocab_rows_cut: int  # embedding rows the vocabulary keep rule leaves (0: no statistics)
    tied: bool
    head_bias: bool  # an untied LM head with a bias: one more entry per vocabulary row
    q_heads: int  # per layer
    kv_heads: int
    head_dim: int
    widths: list  # MLP width per layer
    hidden_round: int = 1  # kept hidden widths are multiples of this and of the kept head count
    per_q_h: int = 0  # one query head: q rows + o_proj columns (hidden-scaled)
    per_q: int = 0  # ... its q bias entries
    per_kv_h: int = 0  # one KV group's k and v rows
    per_kv: int = 0
    per_neuron_h: int = 0  # one MLP neuron: its input-projection rows + its down_proj column
    per_neuron: int = 0  # ... its input-projection biases
    per_layer_h: int = 0  # a block's hidden-sized vectors: norms, o/down biases
    fixed_h: int = 0  # outside blocks, hidden-scaled, not the vocabulary: final norm, positions
    fixed: int = 0  # everything else

    @property
    def layers(self) -> int:
        return len(self.widths)

    def total(self) -> int:
        return estimate(self, Mix())


def costs(model, adapter, vocab_rows_cut: int = 0, hidden_round: int = 1) -> Costs:
    """Read the unit costs from the model, through its adapter (attention projections, MLPs,
    the embedding and LM head). Needs uniform head counts (an unpruned model)."""
    cfg = model.config
    hidden = int(cfg.hidden_size)
    n_q = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_q)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // n_q)
    emb = adapter.embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight is emb
    c = Costs(hidden=hidden, vocab_rows=int(emb.shape[0]), vocab_rows_cut=int(vocab_rows_cut), tied=tied,
              head_bias=not tied and head.bias is not None, q_heads=n_q, kv_heads=n_kv, head_dim=head_dim, widths=list(adapter.widths()),
              hidden_round=int(hidden_round))
    accounted = emb.numel() + (0 if tied else head.weight.numel() + (head.bias.numel() if head.bias is not None else 0))
    att = adapter.attentions()[0]
    if att.q is None:  # a fused q|k|v projection (GPT-2): no per-head split to count here
        raise MinigptError(f"the parameter budget cannot count {adapter.architecture} attention (fused q/k/v)",
                           "set the per-axis keys (prune.ratio, head_ratio, depth) instead of prune.target_params")
    q, k = att.q, att.k
    c.per_q_h = head_dim * hidden * 2
    c.per_q = head_dim if q.bias is not None else 0
    c.per_kv_h = 2 * head_dim * hidden
    c.per_kv = 2 * head_dim if k.bias is not None else 0
    m0 = adapter.mlps()[0]
    c.per_neuron_h = hidden * (len(m0.ins) + 1)
    c.per_neuron = sum(1 for p in m0.ins if p.bias is not None)
    layer0 = adapter.layers()[0]
    block_params = sum(p.numel() for p in layer0.parameters())
    attn = n_q * (c.per_q_h + c.per_q) + n_kv * (c.per_kv_h + c.per_kv)
    mlp = c.widths[0] * (c.per_neuron_h + c.per_neuron)
    c.per_layer_h = block_params - attn - mlp  # norms and the hidden-sized biases
    if c.per_layer_h < 0 or c.per_layer_h % hidden:
        raise MinigptError(f"the parameter budget cannot count {adapter.architecture} blocks "
                           f"({block_params} parameters do not split into heads, neurons and norms)",
                           "set the per-axis keys (prune.ratio, head_ratio, hidden_ratio, depth) instead of "
                           "prune.target_params")
    rest = sum(p.numel() for p in model.parameters()) - accounted - sum(
        sum(p.numel() for p in layer.parameters()) for layer in adapter.layers())
    c.fixed_h = rest  # the final norm (and learned positions): hidden-sized
    return c


def estimate(c: Costs, m: Mix) -> int:
    """Parameters of the model after mix `m` (the unit costs times what is kept)."""
    q_kept, kv_kept = heads_kept(c, m.heads)
    # the kept width is a multiple of the kept head count (transformers 5 checks it), as hidden.apply does
    h = c.hidden - hidden_cut(c, m.hidden, math.lcm(c.hidden_round, q_kept))
    scale = h / c.hidden
    keep_layers = c.layers - m.depth
    per_layer_attn = q_kept * (c.per_q_h * scale + c.per_q) + kv_kept * (c.per_kv_h * scale + c.per_kv)
    # MLP neurons: the same share of every layer's width, rounded per layer as the per_layer
    # allocation does (the others move neurons between layers and keep the total); dropped blocks
    # take their own widths with them, so count the mean kept width of a block
    kept_neurons = sum(w - int(round(m.mlp * w)) for w in c.widths) / c.layers  # per-layer rounding
    per_layer = per_layer_attn + kept_neurons * (c.per_neuron_h * scale + c.per_neuron) + c.per_layer_h * scale
    rows = c.vocab_rows_cut if (m.vocab and c.vocab_rows_cut) else c.vocab_rows
    vocab = rows * (h * (1 if c.tied else 2) + c.head_bias)
    return int(round(keep_layers * per_layer + vocab + c.fixed_h * scale))


def macs(c: Costs, m: Mix, context: int = 0) -> int:
    """Multiply-accumulates per token after mix `m`, for a prefill of `context` tokens: every
    weight matrix of the kept blocks once, the LM head over the kept rows (tied or not: the
    embedding lookup is free, the head's matmul is not), and causal attention, whose scores and
    weighted values cost 2 × head_dim per query head per key, over (context + 1) / 2 keys on
    average (0: weights only). The speed floor of the search (`prune.search_speedup`) reads it;
    norms, softmax and kernel overheads are not counted, so a measured speed-up falls short of
    it (docs/results/benchmarks.md §2)."""
    q_kept, kv_kept = heads_kept(c, m.heads)
    h = c.hidden - hidden_cut(c, m.hidden, math.lcm(c.hidden_round, q_kept))
    kept_neurons = sum(w - int(round(m.mlp * w)) for w in c.widths) / c.layers
    weights = (q_kept * c.per_q_h + kv_kept * c.per_kv_h + kept_neurons * c.per_neuron_h) * h / c.hidden
    attention = q_kept * c.head_dim * (context + 1) if context > 0 else 0
    rows = c.vocab_rows_cut if (m.vocab and c.vocab_rows_cut) else c.vocab_rows
    return int(round((c.layers - m.depth) * (weights + attention) + rows * h))


def speedup(c: Costs, m: Mix, context: int = 0) -> float:
    """The unpruned model's multiply-accumulates per token ÷ the mix's (`macs`)."""
    return macs(c, Mix(), context) / macs(c, m, context)


def heads_kept(c: Costs, ratio: float) -> tuple[int, int]:
    """(query heads, KV groups) kept per layer when `ratio` of the query heads go, GQA-aware:
    whole KV groups first when the cut is a multiple of the group size, else the same number
    of query heads from every group."""
    group = c.q_heads // c.kv_heads
    cut = int(round(ratio * c.q_heads))
    if cut == 0:
        return c.q_heads, c.kv_heads
    if cut % group == 0 and cut < c.q_heads:
        return c.q_heads - cut, c.kv_heads - cut // group
    per_group = math.ceil(cut / c.kv_heads)
    return c.kv_heads * max(1, group - per_group), c.kv_heads


def head_levels(c: Costs) -> list[float]:
    """The head ratios a uniform cut can reach: whole groups, or k heads from every group."""
    group = c.q_heads // c.kv_heads
    kept = {c.q_heads}
    kept.update(c.q_heads - g * group for g in range(1, c.kv_heads))
    kept.update(c.kv_heads * (group - k) for k in range(1, group))
    return sorted(round(1 - n / c.q_heads, 6) for n in kept if n >= 1)


def hidden_cut(c: Costs, ratio: float, round_to: int = 1) -> int:
    """Channels removed for `ratio`, so that the kept width is a multiple of `round_to`."""
    keep = c.hidden - int(round(ratio * c.hidden))
    keep = max(round_to, (keep // round_to) * round_to)
    return c.hidden - keep


def levels(c: Costs, axes) -> dict[str, list]:
    out = {"mlp": [0.0], "heads": [0.0], "hidden": [0.0], "depth": [0], "vocab": [False]}
    if "mlp" in axes:
        out["mlp"] = list(MLP_LEVELS)
    if "heads" in axes:
        out["heads"] = head_levels(c)
    if "hidden" in axes:
        out["hidden"] = list(HIDDEN_LEVELS)
    if "depth" in axes:
        out["depth"] = list(range(0, int(c.layers * DEPTH_SHARE) + 1))
    if "vocab" in axes and c.vocab_rows_cut:
        out["vocab"] = [False, True]
    return out


def target_count(total: int, target: float) -> int:
    """`prune.target_params` as a count: below 1 a share of the total kept, else a count."""
    if target <= 0:
        raise MinigptError("prune.target_params is off", "set it to a share (e.g. 0.5) or a count")
    n = int(round(total * target)) if target < 1 else int(target)
    if n >= total:
        raise MinigptError(f"prune.target_params = {target:g} keeps {n:,} of {total:,} parameters: nothing to remove",
                           "use a share below 1 (e.g. 0.5) or a count below the model's size")
    return n


def feasible(c: Costs, target: int, tolerance: float, axes, min_speedup: float = 0.0,
             context: int = 0) -> list[tuple[Mix, int]]:
    """Every mix on the level grid whose count is within target × (1 ± tolerance) and, when
    `min_speedup` is set, whose estimated speed-up at `context` tokens (`speedup`) reaches it."""
    lv = levels(c, axes)
    lo, hi = target * (1 - tolerance), target * (1 + tolerance)
    out = []
    for mlp in lv["mlp"]:
        for heads in lv["heads"]:
            for hidden in lv["hidden"]:
                for depth in lv["depth"]:
                    for vocab in lv["vocab"]:
                        m = Mix(mlp, heads, hidden, depth, vocab)
                        n = estimate(c, m)
                        if lo <= n <= hi and (not min_speedup or speedup(c, m, context) >= min_speedup):
                            out.append((m, n))
    return out


def _vector(m: Mix, c: Costs) -> tuple:
    return (m.mlp, m.heads, m.hidden * 2, m.depth / max(c.layers * DEPTH_SHARE, 1), 0.5 * m.vocab)


def choose(c: Costs, target: int, tolerance: float, axes, n: int, min_speedup: float = 0.0,
           context: int = 0) -> list[tuple[Mix, int]]:
    """`n` candidates from the feasible mixes: the `BALANCED` × n most balanced ones (smallest
    largest share of an axis's units, the vocabulary cut aside: Minitron found that cutting a
    little from every axis beats cutting one axis hard), and among them the most balanced first, then each next the one farthest from those
    chosen, so the candidates still differ."""
    pool = feasible(c, target, tolerance, axes, min_speedup, context)
    if not pool and min_speedup:
        fastest = max(speedup(c, m, context) for m, _ in feasible(c, target, tolerance, axes) or [(Mix(), 0)])
        raise MinigptError(f"no mix of {', '.join(axes)} within ±{tolerance:.0%} of {target:,} parameters reaches "
                           f"an estimated {min_speedup:g}x speed-up (the fastest reaches {fastest:.2f}x)",
                           "lower prune.search_speedup, add heads or depth to prune.search_axes, "
                           "or lower prune.target_params")
    if not pool:
        raise MinigptError(f"no mix of {', '.join(axes)} lands within ±{tolerance:.0%} of {target:,} parameters",
                           "widen prune.search_tolerance, add axes to prune.search_axes, or move prune.target_params")
    # the vocabulary cut takes only tokens the domain never used: it does not count against balance
    pool.sort(key=lambda mn: (max(_vector(mn[0], c)[:4]), abs(mn[1] - target)))
    # MLP neurons (+ the vocabulary) alone, where they reach the budget: the strongest one-shot
    # axis here (least squares, sequential refits), measured as a candidate rather than left out
    # for being unbalanced (docs/results/compress_smollm2.md: it beat the searched mix)
    mlp_only = next((mn for mn in pool if not (mn[0].heads or mn[0].hidden or mn[0].depth)), None)
    pool = pool[: BALANCED * n]
    if mlp_only is not None and mlp_only not in pool and n > 1:
        pool.append(mlp_only)
    chosen = [pool[0]]
    vecs = {id(mn): _vector(mn[0], c) for mn in pool}

    def dist(a, b):
        return math.dist(vecs[id(a)], vecs[id(b)])

    while len(chosen) < min(n, len(pool)):
        best = max((mn for mn in pool if mn not in chosen), key=lambda mn: min(dist(mn, ch) for ch in chosen))
        chosen.append(best)
    if mlp_only is not None and mlp_only not in chosen and n > 1:
        chosen[-1] = mlp_only
    return chosen


@dataclass
class Trial:
    mix: Mix
    estimated: int
    params: int | None = None  # the applied model's own count
    bpb: float | None = None  # held-out bits per byte after the short distillation
    seconds: float = 0.0
    speedup: float | None = None  # estimated: the unpruned model's MACs per token ÷ the mix's (`speedup`)

    def row(self) -> dict:
        return {**dataclasses.asdict(self.mix), "label": self.mix.label(), "estimated_params": self.estimated,
                "params": self.params, "bpb": self.bpb, "seconds": round(self.seconds, 2),
                "mac_speedup": None if self.speedup is None else round(self.speedup, 3)}


def search(cands: list[tuple[Mix, int]], trial, progress=None, stop=None) -> list[Trial]:
    """Run `trial(mix) -> (params, bpb)` on each candidate, in order; the best is the lowest
    bits per byte. `progress(done, total, rate)` after each; `stop()` may raise to stop."""
    out: list[Trial] = []
    t_all = time.perf_counter()
    for i, (m, est) in enumerate(cands):
        t0 = time.perf_counter()
        params, bpb = trial(m)
        out.append(Trial(m, est, params, bpb, time.perf_counter() - t0))
        if progress:
            progress(i + 1, len(cands), (i + 1) / max(time.perf_counter() - t_all, 1e-9))
        if stop:
            stop()
    return out


def best(trials: list[Trial]) -> Trial:
    return min(trials, key=lambda t: (t.bpb if t.bpb is not None else math.inf, t.estimated))

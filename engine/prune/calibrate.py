"""Calibration: forward hooks record each neuron's activation statistics on domain text.

The paper's score is the mean |activation| over all calibration tokens. We accumulate
sums (|x|, x, x²) per feature, so other criteria (Wanda, FLAP's fluctuation) and bias
compensation reuse the same pass. Hooks never return a value: a forward pre-hook that
returns something silently replaces the module's input.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from engine.models import adapters as adapters_mod
from engine.errors import MinigptError

STATS_FILE = "calibration.safetensors"


def _linear_modules(model):
    """(name, module) of every linear map the adapter knows (nn.Linear, and GPT-2's Conv1D)."""
    return [(p.name, p.module) for p in adapters_mod.for_model(model).linears()]


class Calibrator:
    """Accumulates statistics over batches; `state()` is a plain dict of tensors."""

    def __init__(self, model, linears: bool = True, gram: bool = False, layers: list[int] | None = None):
        self.model = model
        self.gram = gram
        self.adapter = adapters_mod.for_model(model)
        self.mlps = [m for m in self.adapter.mlps() if layers is None or m.layer in layers]
        self.acc: dict[str, torch.Tensor] = {}
        self.n_tokens = 0
        self._handles = []
        self._bufs: dict = {}  # scratch buffers per (shape, dtype, device)
        self._memo = None  # (source tensor, its version, dtype, Σ|x|) of the last input seen
        # on CUDA, accumulate on the GPU: a CPU accumulator cannot take a CUDA tensor in add_
        dev = next(model.parameters()).device
        dev = dev if dev.type == "cuda" else torch.device("cpu")
        for m in self.mlps:
            w = m.width
            for k in ("abs", "sum", "sq"):
                self.acc[f"mlp.{m.layer}.{k}"] = torch.zeros(w, dtype=torch.float64, device=dev)
            if gram:  # opt-in: w×w per layer (1536² for SmolLM2); fp32 unless the model is fp64
                dt = torch.float64 if m.out.module.weight.dtype == torch.float64 else torch.float32
                self.acc[f"mlp.{m.layer}.gram"] = torch.zeros(w, w, dtype=dt)
        self.linear_names = []
        if linears:
            for p in self.adapter.linears():
                self.linear_names.append(p.name)
                self.acc[f"linear.{p.name}.in_abs"] = torch.zeros(p.in_features, dtype=torch.float64, device=dev)
                self.acc[f"linear.{p.name}.out_abs"] = torch.zeros(p.out_features, dtype=torch.float64, device=dev)

    # hooks -----------------------------------------------------------------------
    def _mlp_hook(self, layer: int):
        a, s, q = (self.acc[f"mlp.{layer}.{k}"] for k in ("abs", "sum", "sq"))

        def hook(module, args):
            x = args[0].detach()
            x = (x if x.dtype == torch.float64 else x.float()).reshape(-1, x.shape[-1])  # fp64 stays exact
            a.add_(self._abs_sum(args[0], x).double())
            s.add_(x.sum(0).double())
            q.add_(torch.mul(x, x, out=self._scratch(x)).sum(0).double())
            # returns None on purpose: a returned value would replace the input

        return hook

    def _gram_hook(self, layer: int):
        g = self.acc[f"mlp.{layer}.gram"]

        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(g.dtype)
            g.add_((x.t() @ x).cpu())
            # returns None on purpose

        return hook

    def _linear_hook(self, name: str):
        i, o = self.acc[f"linear.{name}.in_abs"], self.acc[f"linear.{name}.out_abs"]

        def hook(module, args, output):
            x = args[0].detach()
            i.add_(self._abs_sum(args[0], x.float().reshape(-1, x.shape[-1])).double())
            y = output.detach()
            o.add_(self._abs_sum(output, y.float().reshape(-1, y.shape[-1])).double())

        return hook

    # Hook arithmetic, shared. Same ops on the same values as computing each sum afresh
    # (bit-identical statistics), minus the waste: q/k/v (and gate/up) read one input
    # tensor, and the MLP pre-hook and the linear hook of down_proj read the same
    # activation, so its Σ|x| is computed once; temporaries reuse one buffer per shape
    # instead of fresh multi-MB allocations (page faults) in every hook call.
    def _scratch(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.empty(key[0], dtype=x.dtype, device=x.device)
        return buf

    def _abs_sum(self, source: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
        """Σ|x| over rows of `x2d` (a float view of `source`), memoised per source tensor."""
        try:
            version = source._version
        except RuntimeError:  # inference-mode tensors have no version counter: no memo
            version = None
        m = self._memo
        if version is not None and m is not None and m[0] is source and m[1] == version and m[2] == x2d.dtype:
            return m[3]
        val = torch.abs(x2d, out=self._scratch(x2d)).sum(0)
        self._memo = None if version is None else (source, version, x2d.dtype, val)
        return val

    def attach(self) -> "Calibrator":
        for m in self.mlps:
            self._handles.append(m.out.module.register_forward_pre_hook(self._mlp_hook(m.layer)))
            if self.gram:
                self._handles.append(m.out.module.register_forward_pre_hook(self._gram_hook(m.layer)))
        modules = dict(self.model.named_modules())
        for name in self.linear_names:
            self._handles.append(modules[name].register_forward_hook(self._linear_hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._bufs.clear()
        self._memo = None

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    @torch.no_grad()
    def run_batch(self, batch: torch.Tensor) -> None:
        """One forward. The LM head, whose logits nothing here needs, runs only when its own
        statistics are recorded, and then a chunk of rows at a time (a 262k vocabulary never
        materialises tokens × vocabulary): its hooks sum over rows, so chunks add up exactly."""
        from engine.evaluate.perplexity import decoder_and_head, head_chunk

        device = next(self.model.parameters()).device
        dec, _ = decoder_and_head(self.model)
        if dec is None:
            self.model(input_ids=batch.to(device), use_cache=False)
        else:
            hidden = dec(input_ids=batch.to(device), use_cache=False).last_hidden_state
            head = self.model.get_output_embeddings()
            if any(self._hooked(head)):
                h = hidden.reshape(-1, hidden.shape[-1])
                for part in h.split(head_chunk(head)):
                    head(part)
            del hidden
        self._memo = None  # release the last activation
        self.n_tokens += batch.numel()

    def _hooked(self, module):
        modules = dict(self.model.named_modules())
        return (modules.get(n) is module for n in self.linear_names)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.acc.items()}


def calibrate(model, calib_blocks: torch.Tensor, batch_size: int, progress=None, linears: bool = True,
              start_batch: int = 0, resume_state: dict | None = None, on_batch=None,
              gram: bool = False, dist=None) -> "Stats":
    """Run the calibration blocks through the model with hooks attached.

    `resume_state`/`start_batch` continue a partial pass (written by `on_batch`), which
    makes the result bit-identical to an uninterrupted one. `gram` also accumulates each
    MLP's activation Gram matrix Σ x xᵀ (least-squares compensation, the `obs` criterion).

    `dist` (an `engine.distributed.Dist`): batch i runs on rank i % world, then every sum
    (Σ|x|, Σx, Σx², the Gram matrices, the token count) is all-reduced, so each rank ends
    with the statistics of all the blocks. Batches then go in rounds of `world` (one per
    rank): `start_batch` and `on_batch`'s count are rounds, and the states `on_batch` gets
    and `resume_state` takes are this rank's own partial sums.
    """
    from engine.distributed import Dist

    dist = dist or Dist(solo=True)
    if calib_blocks.numel() == 0:
        raise MinigptError("no calibration tokens", "use a larger corpus or a smaller calibrate.block_size")
    cal = Calibrator(model, linears=linears, gram=gram)
    if resume_state:
        for k, v in resume_state.items():
            if k in cal.acc:
                cal.acc[k].copy_(v)
        cal.n_tokens = int(resume_state["n_tokens"].item())
    n = calib_blocks.shape[0]
    batches = [calib_blocks[i:i + batch_size] for i in range(0, n, batch_size)]
    rounds = -(-len(batches) // dist.world)
    total = calib_blocks.numel()
    t0 = time.perf_counter()
    done0 = cal.n_tokens
    with cal:
        for r in range(start_batch, rounds):
            bi = r * dist.world + dist.rank
            if bi < len(batches):
                cal.run_batch(batches[bi])
            if progress:  # this rank's tokens × world: the whole pass's progress, near enough
                dt = time.perf_counter() - t0
                done = min(total, cal.n_tokens * dist.world)
                rate = (cal.n_tokens - done0) * dist.world / dt if dt > 0 else 0.0
                progress(done, total, rate)
            if on_batch:
                on_batch(r + 1, {**cal.state(), "n_tokens": torch.tensor(cal.n_tokens)})
    if dist.on:
        dist.all_sum(cal.acc.values())
        cal.n_tokens = int(dist.sum_floats(cal.n_tokens)[0])
    return Stats(cal.state(), cal.n_tokens)


def token_counts(ids: torch.Tensor, vocab_size: int, dist=None) -> torch.Tensor:
    """How often each id occurs in `ids`; with `dist`, each rank counts its share and the counts
    are all-reduced."""
    ids = ids.flatten()
    width = max(vocab_size, int(ids.max()) + 1)
    if dist is not None and dist.on:
        part = ids.tensor_split(dist.world)[dist.rank]
        counts = torch.bincount(part, minlength=width)
        dist.all_sum([counts])
        return counts
    return torch.bincount(ids, minlength=vocab_size)[:width]


class Stats:
    """Calibration statistics: per-feature sums over `n_tokens` tokens, plus token counts."""

    def __init__(self, tensors: dict[str, torch.Tensor], n_tokens: int, meta: dict | None = None):
        self.t = tensors
        self.n_tokens = n_tokens
        self.meta = meta or {}

    def mlp_layers(self) -> list[int]:
        return sorted({int(k.split(".")[1]) for k in self.t if k.startswith("mlp.")})

    def mlp_mean_abs(self, layer: int) -> torch.Tensor:
        return self.t[f"mlp.{layer}.abs"] / self.n_tokens

    def mlp_mean(self, layer: int) -> torch.Tensor:
        return self.t[f"mlp.{layer}.sum"] / self.n_tokens

    def mlp_mean_sq(self, layer: int) -> torch.Tensor:
        return self.t[f"mlp.{layer}.sq"] / self.n_tokens

    def mlp_gram(self, layer: int) -> torch.Tensor | None:
        """E[x xᵀ] over calibration tokens (float64), or None when not collected."""
        t = self.t.get(f"mlp.{layer}.gram")
        return None if t is None else t.double() / self.n_tokens

    def has_gram(self) -> bool:
        return all(f"mlp.{i}.gram" in self.t for i in self.mlp_layers())

    def linear_in(self, name: str) -> torch.Tensor | None:
        t = self.t.get(f"linear.{name}.in_abs")
        return None if t is None else t / self.n_tokens

    def linear_out(self, name: str) -> torch.Tensor | None:
        t = self.t.get(f"linear.{name}.out_abs")
        return None if t is None else t / self.n_tokens

    @property
    def token_counts(self) -> torch.Tensor | None:
        return self.t.get("token_counts")

    def save(self, folder: Path) -> Path:
        from safetensors.torch import save_file

        from engine import atomic

        path = Path(folder) / STATS_FILE
        tensors = {k: v.contiguous() for k, v in self.t.items()}
        metadata = {"n_tokens": str(self.n_tokens), "meta": json.dumps(self.meta)}
        atomic.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        atomic.write_json(Path(folder) / "calibration.json", {"n_tokens": self.n_tokens, **self.meta})
        return path

    @classmethod
    def load(cls, folder: Path) -> "Stats":
        from safetensors import safe_open

        path = Path(folder) / STATS_FILE
        if not path.exists():
            raise MinigptError(f"no calibration statistics in {folder}", "run the calibrate stage first")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise MinigptError(f"calibration statistics {path} are corrupt ({e})",
                               "delete the file and rerun: minigpt calibrate SESSION") from None
        return cls(tensors, int(meta.get("n_tokens", 0)), json.loads(meta.get("meta", "{}")))

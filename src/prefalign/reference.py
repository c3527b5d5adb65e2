"""The reference model as a strategy: a frozen copy, the LoRA policy with its adapters
off, log-probs precomputed once and cached on disk, or none.

Every strategy answers the same two questions with no gradient: the summed log-probs
of each pair's chosen/rejected completions, and of single completions (KTO).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from prefalign import objective
from prefalign.errors import UserError, os_error_from, os_error_line
from prefalign.logprobs import SeqLogps


class Reference:
    """Base: no reference at all (ORPO, SimPO, SFT)."""

    name = "none"

    def pair_logps(self, items) -> objective.PairLogps | None:
        return None

    def completion_logps(self, prompts, completions) -> SeqLogps | None:
        return None


class ModelReference(Reference):
    """A frozen model: a second copy, or the policy with LoRA adapters disabled."""

    def __init__(self, model, *, pad_id: int, packing: bool, token_budget: int, chunk_size: int,
                 adapters_off: bool = False, autocast=None):
        self.model = model
        self.name = "adapters-off" if adapters_off else "copy"
        self.adapters_off = adapters_off
        self.kw = dict(pad_id=pad_id, packing=packing, token_budget=token_budget, chunk_size=chunk_size)
        self.autocast = autocast or contextlib.nullcontext

    @contextlib.contextmanager
    def _mode(self):
        was_training = self.model.training
        self.model.eval()  # no dropout in the reference: it must be a fixed function
        try:
            with torch.no_grad(), self.autocast():
                if self.adapters_off:
                    with self.model.disable_adapter():
                        yield
                else:
                    yield
        finally:
            self.model.train(was_training)

    def pair_logps(self, items):
        with self._mode():
            return objective.pair_logps(self.model, items, **self.kw)

    def completion_logps(self, prompts, completions):
        with self._mode():
            return objective.completion_logps(self.model, prompts, completions, **self.kw)


def pair_key(item) -> tuple:
    return (tuple(item.prompt_ids), tuple(item.chosen_ids), tuple(item.rejected_ids))


class PrecomputedReference(Reference):
    """Reference log-probs looked up by pair content: no reference forward during training."""

    name = "precomputed"

    def __init__(self, table: dict[tuple, tuple[float, float, int, int]]):
        self.table = table

    def pair_logps(self, items):
        try:
            rows = [self.table[pair_key(it)] for it in items]
        except KeyError:
            raise RuntimeError("a pair has no precomputed reference log-prob (cache built from other data)")
        t = torch.tensor([r[:2] for r in rows], dtype=torch.float32)
        n = torch.tensor([r[2:] for r in rows], dtype=torch.long)
        return objective.PairLogps(t[:, 0], t[:, 1], n[:, 0], n[:, 1])

    def completion_logps(self, prompts, completions):
        raise UserError("reference precomputed supports paired losses only; use --reference copy for KTO")


def cache_key(model_id: str, model, items, settings: dict) -> str:
    """Keyed by model + data + tokenization: any change gives a new cache file."""
    h = hashlib.sha256()
    h.update(model_id.encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():  # a cheap fingerprint of the weights themselves
        for p in list(model.parameters())[:4]:
            h.update(f"{p.double().sum().item():.12e}".encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for it in items:
        h.update(repr(pair_key(it)).encode())
    return h.hexdigest()[:24]


def precompute(ref: ModelReference, items, batches: list[list[int]], cache_dir: str, key: str,
               accelerator=None, progress=None, log=print) -> PrecomputedReference:
    """One pass of the reference over all pairs, cached on disk.

    `batches`: this process's micro-batches, as indices into `items`. The caller passes the
    batches in which training will first score each pair: a pair's log-prob moves in the last
    bits with what else is in its padded batch (matmul shapes; whole bf16 roundings under
    autocast), so only the same batch makes the step-1 log-ratio exactly zero.
    A cache file that is damaged (cut short, emptied, flipped bits) is recomputed, never used."""
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):  # before the pass, not after it
        raise UserError(f"--cache-dir {cache_dir} is a file, not a directory")
    path = os.path.join(cache_dir, f"ref-{key}.safetensors")
    if os.path.exists(path):
        cached, problem = read_cache(path, len(items))
        if cached is not None:
            return _table(items, *cached)
        log(f"reference cache {path} is damaged ({problem}); recomputing it")
    world = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    vals = torch.zeros(len(items), 2)
    cnts = torch.zeros(len(items), 2, dtype=torch.long)
    for idx in batches:
        out = ref.pair_logps([items[i] for i in idx])
        vals[idx] = torch.stack([out.chosen, out.rejected], 1).float().cpu()
        cnts[idx] = torch.stack([out.chosen_count, out.rejected_count], 1).cpu()
        if progress:
            progress(len(idx) * world)
    if world > 1:  # every process wrote only its own rows; the sum fills the table
        vals = accelerator.reduce(vals.to(accelerator.device), reduction="sum").cpu()
        cnts = accelerator.reduce(cnts.to(accelerator.device), reduction="sum").cpu()
    if rank == 0:
        write_cache(path, vals.contiguous(), cnts.contiguous())
    return _table(items, vals, cnts)


def _table(items, vals: torch.Tensor, cnts: torch.Tensor) -> PrecomputedReference:
    return PrecomputedReference({pair_key(it): (*v, *c) for it, v, c in zip(items, vals.tolist(), cnts.tolist())})


def _checksum(vals: torch.Tensor, cnts: torch.Tensor) -> str:
    return hashlib.sha256(vals.numpy().tobytes() + cnts.numpy().tobytes()).hexdigest()


def write_cache(path: str, vals: torch.Tensor, cnts: torch.Tensor) -> None:
    """Written under a temporary name and renamed: a crash leaves no half file under `path`."""
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save_file({"values": vals, "counts": cnts}, tmp, metadata={"sha256": _checksum(vals, cnts)})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        error = os_error_from(e, path)
        if error is None:
            raise
        raise UserError(f"{path}: cannot write the reference cache: {os_error_line(error).rsplit(': ', 1)[-1]} "
                        f"(choose another --cache-dir)") from None


def read_cache(path: str, n: int) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str]:
    """((values [n, 2], counts [n, 2]), "") from an intact cache of n pairs, else (None, why not)."""
    try:
        with safe_open(path, "pt") as fh:
            meta = fh.metadata() or {}
            t = {k: fh.get_tensor(k) for k in fh.keys()}
    except (OSError, SafetensorError) as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__
    vals, cnts = t.get("values"), t.get("counts")
    if vals is None or cnts is None or vals.dtype != torch.float32 or cnts.dtype != torch.long:
        return None, "not a reference cache"
    if vals.shape != (n, 2) or cnts.shape != (n, 2):
        return None, f"shape {list(vals.shape)} for {n} pairs"
    if meta.get("sha256") != _checksum(vals, cnts):
        return None, "checksum mismatch"
    return (vals, cnts), ""

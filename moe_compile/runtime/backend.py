"""One Backend interface: activate, reset the KV cache for a batch, run one decoder step.

Subclasses write `_activate`, `_reset` and `_step`; the public methods check state and inputs
(Polygraphy's runner template), so every backend rejects the same bad requests the same way.
A backend class may have variants for other ONNX forms (manifest.form): a subclass that sets `form`
serves that form under its parent's name, and `BACKENDS[name](out, manifest)` builds the variant the
manifest asks for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import RequestError
from ..export.manifest import Manifest
from .memory import free_bytes
from .sampling import Chooser

BACKENDS: dict[str, type[Backend]] = {}
FORMS: dict[tuple[str, str], type[Backend]] = {}  # (backend name, manifest form) -> the variant serving it


class Backend:
    name: str
    device: str  # where the KV cache lives: "cpu" or "cuda"
    form = "portable"  # the manifest form this class runs

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "form" in cls.__dict__:
            FORMS[cls.name, cls.form] = cls
        elif "name" in cls.__dict__:
            BACKENDS[cls.name] = cls

    def __new__(cls, out: Path, manifest: Manifest, **options):
        name = getattr(cls, "name", None)
        if BACKENDS.get(name) is cls:  # a registered backend: its variant for the build's form (other subclasses stay)
            cls = FORMS.get((name, getattr(manifest, "form", "portable")), cls)
        return super().__new__(cls)

    def __init__(self, out: Path, manifest: Manifest, cuda_graph: bool = True):
        """`cuda_graph`: replay decode steps as CUDA graphs where the backend can (ort-cuda, ort form)."""
        self.out, self.manifest = Path(out), manifest
        self.cuda_graph = cuda_graph
        self.active = False
        self.batch = 0
        self.length = 0  # tokens in the KV cache

    def activate(self) -> Backend:
        if not self.active:
            self._activate()
            self.active = True
        return self

    def reset(self, batch: int) -> None:
        """Start a new sequence batch with an empty KV cache."""
        if not 1 <= batch <= self.manifest.max_batch:
            raise RequestError(f"batch of {batch} is outside this build's 1..{self.manifest.max_batch} (--max-batch)")
        self.activate()
        self.batch, self.length = 0, 0  # a refused or failed `_reset` leaves no batch to step
        self._reset(batch)
        self.batch = batch

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Feed [B, S] new tokens; returns float32 logits [B, S, V] and extends the KV cache."""
        return self._checked(self._step, input_ids, attention_mask, position_ids)

    def step_last(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Like `step`, but returns only the last position's logits [B, V]: what the decode loop samples
        from. Backends that keep logits on a device copy only these rows to the host."""
        return self._checked(self._step_last, input_ids, attention_mask, position_ids)

    def step_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                    chooser: Chooser) -> np.ndarray:
        """Like `step_last`, but returns each row's next token [B] as `chooser` picks it. Backends whose
        graph chooses on the device copy only the token ids (or the top candidates) to the host."""
        return self._checked(lambda *inputs: self._step_tokens(*inputs, chooser), input_ids, attention_mask, position_ids)

    def _checked(self, run, input_ids, attention_mask, position_ids) -> np.ndarray:
        batch, new = input_ids.shape
        if batch != self.batch:
            raise RequestError(f"step got batch {batch} but the cache was reset for {self.batch}")
        if self.length + new > self.manifest.max_seq:
            raise RequestError(
                f"{self.length + new} tokens exceed this build's max_seq {self.manifest.max_seq}; "
                "rebuild with a larger --max-seq"
            )
        if attention_mask.shape != (batch, self.length + new):
            raise RequestError(f"attention_mask shape {attention_mask.shape} != {(batch, self.length + new)}")
        logits = run(input_ids.astype(np.int64), attention_mask.astype(np.int64), position_ids.astype(np.int64))
        self.length += new
        return logits

    def _activate(self) -> None:
        raise NotImplementedError

    def _reset(self, batch: int) -> None:
        raise NotImplementedError

    def _step(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        raise NotImplementedError

    def _step_last(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        return self._step(input_ids, attention_mask, position_ids)[:, -1]

    def _step_tokens(self, input_ids, attention_mask, position_ids, chooser: Chooser) -> np.ndarray:
        return chooser(self._step_last(input_ids, attention_mask, position_ids))

    def require_kv_memory(self, rows: int, copies: int, held_rows: int = 0) -> None:
        """Refuse, before allocating anything, `copies` KV caches of `rows` sequences of max_seq tokens that the
        device's free memory cannot hold. `held_rows`: the rows of the caches the backend frees first.
        Every backend that preallocates its cache calls this just before it does."""
        free = free_bytes(self.device)
        if free is None:
            return
        free += copies * self.manifest.kv_cache_bytes(held_rows)
        need = copies * self.manifest.kv_cache_bytes(rows)
        if need <= free:
            return
        raise RequestError(
            f"backend '{self.name}': the KV cache of {rows} sequence(s) x max_seq {self.manifest.max_seq} needs "
            f"{need:,} bytes ({need / 2**20:.4g} MiB) on {self.device}, but {free:,} bytes ({free / 2**20:.4g} MiB) "
            "are free; run fewer sequences at once (a smaller batch, or for TensorRT a build with a smaller --max-batch), "
            "or rebuild with a smaller --max-seq")

    def kv_names(self) -> tuple[list[str], list[str]]:
        past = [i["name"] for i in self.manifest.inputs if i["name"].startswith("past_key_values.")]
        present = [o["name"] for o in self.manifest.outputs if o["name"].startswith("present.")]
        return past, present

    def empty_kv_shapes(self, batch: int) -> list[tuple[int, ...]]:
        shapes = []
        for key, value in self.manifest.kv["layers"]:
            shapes += [(batch, key[0], 0, key[1]), (batch, value[0], 0, value[1])]
        return shapes

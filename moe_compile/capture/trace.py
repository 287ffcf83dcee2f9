"""Capture the decoder step with `torch.export`, dynamic in batch, new tokens and past length."""

from __future__ import annotations

import dataclasses
import traceback

import torch
from torch.export import Dim, ExportedProgram
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from ..errors import UnsupportedModelError
from ..models import family_for
from .complex_rope import real_rope
from .decoder_step import DecoderStep, InPlaceDecoderStep, kv_names, kv_shapes
from .experts_op import traceable
from .outer_product import outer_products_as_multiply

INPUT_NAMES = ["input_ids", "attention_mask", "position_ids"]
INPLACE_INPUT_NAMES = ["input_ids", "attention_mask"]
INPLACE_OUTPUT_NAMES = ["logits", "next_token", "top_logits", "top_ids"]
# Sample sizes for tracing: none may be 0 or 1 (export specialises those), all distinct.
_SAMPLE_BATCH, _SAMPLE_NEW, _SAMPLE_PAST = 2, 3, 5
MIN_MAX_SEQ = _SAMPLE_NEW + _SAMPLE_PAST


@dataclasses.dataclass
class Captured:
    program: ExportedProgram
    input_names: list[str]
    output_names: list[str]
    kv_shapes: list  # per layer ((heads, key_dim), (heads, value_dim))
    moe_layers: list[str]  # qualified names of the experts modules routed through the op
    max_batch: int
    max_seq: int
    form: str = "portable"
    candidates: int = 0  # ort form: the TopK output's width

    @property
    def dtype(self) -> torch.dtype:
        return next(t.dtype for t in self.program.state_dict.values() if t.is_floating_point())


def sample_inputs(shapes, dtype, batch, new, past, vocab: int = 2, seed: int = 0):
    """Decoder-step inputs with random ids and KV; seeded, so the build's check is reproducible."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, new), generator=generator)
    attention_mask = torch.ones(batch, past + new, dtype=torch.long)
    position_ids = (torch.arange(new) + past).expand(batch, new).contiguous()
    kv = []
    for (kh, kd), (vh, vd) in shapes:
        kv += [torch.randn(batch, kh, past, kd, generator=generator).to(dtype),
               torch.randn(batch, vh, past, vd, generator=generator).to(dtype)]
    return (input_ids, attention_mask, position_ids, *kv)


def inplace_sample_inputs(shapes, dtype, batch, lengths, max_seq, vocab: int = 2, seed: int = 0, decode: bool = False):
    """The ort form's inputs for a right-padded prefill of rows of `lengths` tokens (or, with `decode`,
    one new token per row after `lengths` cached ones), with random ids and an empty (random) cache."""
    generator = torch.Generator().manual_seed(seed)
    new = 1 if decode else max(lengths)
    input_ids = torch.randint(0, vocab, (batch, new), generator=generator)
    width = max_seq if decode else new
    filled = [n + 1 for n in lengths] if decode else lengths
    attention_mask = (torch.arange(width)[None] < torch.tensor(filled)[:, None]).long()
    kv = []
    for (kh, kd), (vh, vd) in shapes:
        kv += [torch.randn(batch, kh, max_seq, kd, generator=generator).to(dtype),
               torch.randn(batch, vh, max_seq, vd, generator=generator).to(dtype)]
    return (input_ids, attention_mask, *kv)


def capture(model: torch.nn.Module, max_batch: int, max_seq: int, form: str = "portable", candidates: int = 64) -> Captured:
    """Export the model's decoder step. Sizes up to max_batch/max_seq are served by the graph."""
    if form == "ort":
        return _capture_inplace(model, max_batch, max_seq, candidates)
    shapes = kv_shapes(model)
    past_names, present_names = kv_names(len(shapes))
    # Export needs ranges that admit the traced sample; the runtime enforces the real bounds.
    batch = Dim("batch_size", min=1, max=max(max_batch, _SAMPLE_BATCH))
    new = Dim("sequence_length", min=1, max=max_seq)
    past = Dim("past_sequence_length", min=0, max=max_seq - 1)
    # The mask spans past + new; derived dims can only be `a*x + b` of one dim, so it gets its own.
    # Its bound is one above max_seq: the solver reasons about it apart from past and new.
    total = Dim("total_sequence_length", min=1, max=max_seq + 1)
    # The last entry covers DecoderStep's *past varargs.
    dynamic = ({0: batch, 1: new}, {0: batch, 1: total}, {0: batch, 1: new}, ({0: batch, 2: past},) * len(past_names))
    args = sample_inputs(shapes, model.dtype, _SAMPLE_BATCH, _SAMPLE_NEW, _SAMPLE_PAST, model.config.vocab_size)
    step = DecoderStep(model, max_seq)
    complex_rope = family_for(model.config.model_type).complex_rope
    with traceable(model) as modules, real_rope(model, complex_rope), outer_products_as_multiply(), torch.no_grad():
        # Size-oblivious reasoning keeps 0 (empty past) and 1 (one new token, batch 1) in range.
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            try:
                program = torch.export.export(step, args, dynamic_shapes=dynamic, strict=False)
            except GuardOnDataDependentSymNode as exc:
                raise UnsupportedModelError(
                    f"{model.config.model_type}: unsupported because its code branches on tensor values "
                    f"({_model_frame(exc)}), which a static-shape graph cannot capture"
                ) from exc
    return Captured(
        program=program,
        input_names=INPUT_NAMES + past_names,
        output_names=["logits"] + present_names,
        kv_shapes=shapes,
        moe_layers=list(modules),
        max_batch=max_batch,
        max_seq=max_seq,
    )


def _capture_inplace(model: torch.nn.Module, max_batch: int, max_seq: int, candidates: int) -> Captured:
    """The ort form (InPlaceDecoderStep): dynamic batch, new tokens and mask width; the cache is max_seq long."""
    from .gqa import IMPLEMENTATION, deferred_rotary

    shapes = kv_shapes(model)
    past_names, present_names = kv_names(len(shapes))
    batch = Dim("batch_size", min=1, max=max(max_batch, _SAMPLE_BATCH))
    new = Dim("sequence_length", min=1, max=max_seq)
    total = Dim("total_sequence_length", min=1, max=max_seq)
    dynamic = ({0: batch, 1: new}, {0: batch, 1: total}, ({0: batch},) * len(past_names))
    # traced as a prefill whose mask is wider than its tokens (distinct sizes keep the dims apart)
    args = inplace_sample_inputs(shapes, model.dtype, _SAMPLE_BATCH, [_SAMPLE_NEW] * _SAMPLE_BATCH, max_seq,
                                 model.config.vocab_size)
    args = (args[0], torch.ones(_SAMPLE_BATCH, _SAMPLE_NEW + _SAMPLE_PAST, dtype=torch.long), *args[2:])
    step = InPlaceDecoderStep(model, max_seq, candidates)
    with traceable(model, IMPLEMENTATION) as modules, deferred_rotary(model), outer_products_as_multiply(), torch.no_grad():
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            program = torch.export.export(step, args, dynamic_shapes=dynamic, strict=False)
    return Captured(
        program=program,
        input_names=INPLACE_INPUT_NAMES + past_names,
        output_names=INPLACE_OUTPUT_NAMES + present_names,
        kv_shapes=shapes,
        moe_layers=list(modules),
        max_batch=max_batch,
        max_seq=max_seq,
        form="ort",
        candidates=step.candidates,
    )


def _model_frame(exc: BaseException) -> str:
    """The innermost transformers source line in the traceback: where the model branched."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/transformers/" in f.filename]
    if not frames:
        return "location unknown"
    frame = frames[-1]
    return f"{frame.filename[frame.filename.rindex('/transformers/') + 1:]}:{frame.lineno} in {frame.name}: {frame.line}"

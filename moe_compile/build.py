"""`build`: checkpoint -> OUT/{model.onnx, manifest.json, program.pt2, tokenizer/, engine.plan}.

Stages: load, capture, passes, export, check, engine (TensorRT: moe_compile/trt/). Before any of
them, the checkpoint's config.json is validated and its memory estimated, and OUT's parent is checked
(build_dir.py). OUT is written atomically: everything goes to a staging directory beside it that
replaces OUT only once complete, so a failed or interrupted build leaves no half-written OUT and a
previous good build stays until the new one is whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .build_dir import check_out, check_room, staging
from .capture import capture
from .capture.trace import MIN_MAX_SEQ, inplace_sample_inputs, sample_inputs
from .errors import MoeCompileError, RequestError
from .export.manifest import ONNX_FILE, Manifest, io_signature, tool_versions
from .export.onnx_export import IR_VERSION, OPSET, export_onnx
from .models.config_check import check_fits, file_bytes
from .models.loading import DTYPES, load_model, read_family, resolve_checkpoint
from .passes import LOWERINGS, PassManager, lowering_pipeline
from .passes.auto import DEFAULT_THRESHOLD
from .quantize import check_config as check_quantized_config
from .quantize import check_request as quantize_request
from .quantize.onnx_rewrite import DQ_OPSET, quantize_model
from .quantize.torch_weights import fake_quantize
from .passes.run_size import experts_shapes, max_run_tokens
from .runtime.ort_install import import_onnxruntime
from .runtime.torch_backend import PROGRAM_FILE
from .trt.engine import build_engine

log = logging.getLogger("moe_compile")
BUILD_BACKENDS = ("auto", "onnx", "trt")
FORMS = ("auto", "ort", "portable")
DEFAULT_MAX_SEQ = 2048
SAMPLING_CANDIDATES = 64  # the ort form's TopK width: top-k sampling up to this k reads no logits row


def build(
    model: str,
    out: str | Path,
    dtype: str = "fp32",
    lowering: str | None = None,
    max_batch: int = 8,
    max_seq: int | None = None,
    auto_threshold: int = DEFAULT_THRESHOLD,
    trust_remote_code: bool = False,
    progress: bool = True,
    backend: str = "auto",
    timing_cache: str | Path | None = None,
    torch_program: bool = True,
    form: str = "auto",
    force: bool = False,
    quantize: str | None = None,
    block_size: int | None = None,
    quantize_lm_head: bool = False,
    scales: str | None = None,
) -> Path:
    """`form`: "ort" is ONNX Runtime's in-place form (GroupQueryAttention over a preallocated cache, one
    MoE node per layer, token choice in the graph), "portable" the past/present form every runtime
    reads (TensorRT's engine is built from it); "auto" takes ort where the family has it and neither
    `--lowering` (other than fused) nor `--backend trt` asks for the portable one.
    `lowering` (portable form; default auto): how MoE layers become static subgraphs.
    `backend`: "auto" builds engine.plan from a portable build when a TensorRT package is installed,
    "trt" requires one, "onnx" skips the engine. `torch_program=False` leaves out program.pt2 (the torch
    backends' input, portable form only), which holds a second copy of the weights.
    `max_seq` defaults to 2048 or the model's max_position_embeddings if smaller. `force` builds a model
    whose estimated memory exceeds what is available.
    `quantize` ("int8"/"int4"; `block_size`, `quantize_lm_head`, `scales` "absmax"/"mse"): weight-only quantization
    (moe_compile/quantize/)."""
    out = check_out(out)
    check_request(dtype, lowering or "auto", max_batch, max_seq)
    if form not in FORMS:
        raise RequestError(f"unknown form '{form}'; choose one of {', '.join(FORMS)}")
    if form == "ort" and lowering not in (None, "fused"):
        raise RequestError(f"--lowering {lowering} is a portable-form choice: the ort form lowers every MoE layer to "
                           "one com.microsoft:MoE node; build with --form portable")
    if form == "ort" and backend == "trt":
        raise RequestError("TensorRT engines are built from the portable form; build with --form portable")
    import_onnxruntime()  # the check stage runs the ONNX on ONNX Runtime: without one, refuse before any work
    quantization = quantize_request(quantize, block_size, quantize_lm_head, form, lowering, scales)
    stages = _Stages(progress)
    if backend == "trt":  # refuse before any work: the engine needs TensorRT, and the portable form
        engine_builder(backend, lowering or "auto")
    path = resolve_checkpoint(model)
    config, family = read_family(path)
    check_quantized_config(quantization, path, family.model_type)
    max_seq = bound_max_seq(max_seq, config.max_position_embeddings)
    needs = check_fits(config, dtype, force)
    program = needs.weight_bytes if torch_program and form != "ort" else 0  # program.pt2: the weights again, unpacked
    with staging(out, file_bytes(config, dtype, quantization) + program) as tmp:
        with stages("load"):
            torch_model = load_model(path, dtype, trust_remote_code)
            form, form_reason = choose_form(form, family, torch_model.config, lowering, backend)
            lowering = "fused" if form == "ort" else (lowering or "auto")
            tensorrt = engine_builder(backend, lowering) if form == "portable" else None
            if quantization is not None:  # the captured program becomes the dequantized reference
                fake_quantize(torch_model, quantization)
        if form == "ort" and backend == "auto" and _has_tensorrt():
            log.info("engine skipped: engine.plan is built from the portable form (--form portable)")
        with stages("capture"):
            captured = capture(torch_model, max_batch, max_seq, form, SAMPLING_CANDIDATES)
        row = max_seq * sum(h * d for layer in captured.kv_shapes for h, d in layer) * DTYPES[dtype].itemsize
        stages.note(f"KV cache at max_seq {max_seq}: {row / 2**20:.1f} MiB per sequence, "
                    f"{row * max_batch / 2**20:.1f} MiB at max_batch {max_batch}")
        with stages("passes"):
            # The ort form has no If (CUDA graphs refuse it): a layer the MoE node cannot express gets `gather`.
            options = {"fallback": "gather"} if form == "ort" else {}
            passes = PassManager(lowering_pipeline(lowering), auto_threshold=auto_threshold, **options)
            shapes = experts_shapes(captured.program)
            program, _ = passes.run(captured.program)
            layers = {name: per_layer(name, passes.layers, lowering) for name in captured.moe_layers}
            # the portable form's attention materialises [B, heads, S, past + S] scores; GroupQueryAttention does not
            scores = 0 if form == "ort" else getattr(torch_model.config, "num_attention_heads", 0) * max_seq
            run_tokens = max_run_tokens(shapes, layers, auto_threshold, scores)
            if run_tokens is not None and run_tokens < max_batch:
                raise RequestError(f"a decode step of {max_batch} rows would make tensors past 2^31 elements with this "
                                   f"lowering; build with --max-batch {run_tokens} or less, or another --lowering")
        with stages("export"):
            quantized = []
            rewrite = (lambda m: quantized.append(quantize_model(m, quantization, form, engine=tensorrt is not None))
                       ) if quantization else None
            export_onnx(program, captured.input_names, captured.output_names, tmp / ONNX_FILE, ort_fusions=form == "ort",
                        rewrite=rewrite)
            if torch_program and form == "portable":
                # about the ONNX's bytes again; torch aborts the process (no exception) on a full disk
                check_room(tmp, sum(p.stat().st_size for p in tmp.iterdir()), PROGRAM_FILE)
                torch.export.save(program, str(tmp / PROGRAM_FILE))
            tokenizer_error = save_tokenizer(path, tmp / "tokenizer", trust_remote_code)
        inputs, outputs = io_signature(tmp / ONNX_FILE)
        config = torch_model.config
        eos = torch_model.generation_config.eos_token_id
        eos = eos if eos is not None else config.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = torch_model.generation_config.pad_token_id
        manifest = Manifest(
            family=family.describe(config),
            source=model,
            dtype=dtype,
            lowering=lowering,
            auto_threshold=auto_threshold,
            layers=layers,
            fallbacks={name: why for name in captured.moe_layers if (why := per_layer(name, passes.reasons, None))},
            max_batch=max_batch,
            max_seq=max_seq,
            max_position_embeddings=getattr(config, "max_position_embeddings", None),
            vocab_size=config.vocab_size,
            eos_token_ids=eos_ids,
            pad_token_id=pad if pad is not None else (eos_ids[0] if eos_ids else 0),
            kv={"layout": "shared_buffer" if form == "ort" else "past_present_concat",
                "axes": ["batch_size", "kv_heads", "max_seq" if form == "ort" else "sequence", "head_dim"],
                "num_layers": len(captured.kv_shapes), "layers": [list(map(list, s)) for s in captured.kv_shapes]},
            form=form,
            form_reason=form_reason,
            sampling_candidates=captured.candidates,
            max_run_tokens=run_tokens,
            inputs=inputs,
            outputs=outputs,
            opset=max([OPSET, *(DQ_OPSET for q in quantized if q["ops"].get("DequantizeLinear"))]),
            ir_version=IR_VERSION,
            files=sorted(p.name for p in tmp.iterdir() if p.is_file()),
            tokenizer=(tmp / "tokenizer").is_dir(),
            tokenizer_error=tokenizer_error,
            tool_versions=tool_versions(),
            quantization=quantized[0] if quantized else None,
        )
        manifest.write(tmp)
        with stages("check"):
            reference = check_reference(manifest, program, captured)
            del torch_model, program, captured, passes  # their weights go before ONNX Runtime loads the build's
            gc.collect()
            check_build(tmp, manifest, reference)
        if tensorrt is not None:
            with stages("engine"):
                manifest.engine = build_engine(tmp, manifest, tensorrt, Path(timing_cache) if timing_cache else None)
            manifest.files.append(manifest.engine["file"])
            manifest.write(tmp)
    return out


def check_request(dtype: str, lowering: str, max_batch: int, max_seq: int | None) -> None:
    """Refuse bad arguments before any work."""
    if dtype not in DTYPES:
        raise RequestError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if lowering not in LOWERINGS:
        raise RequestError(f"unknown lowering '{lowering}'; choose one of {', '.join(LOWERINGS)}")
    if max_batch < 1:
        raise RequestError(f"--max-batch must be >= 1, got {max_batch}")
    if max_seq is not None and max_seq < MIN_MAX_SEQ:
        raise RequestError(f"--max-seq must be >= {MIN_MAX_SEQ}, got {max_seq}")


def bound_max_seq(max_seq: int | None, max_positions: int | None) -> int:
    """The request's max_seq (default 2048), within the positions the model was made for."""
    if max_seq is None:
        return min(DEFAULT_MAX_SEQ, max_positions or DEFAULT_MAX_SEQ)
    if max_positions is not None and max_seq > max_positions:
        raise RequestError(f"--max-seq {max_seq} exceeds the model's max_position_embeddings {max_positions}; "
                           f"build with --max-seq {max_positions} or less")
    return max_seq


def choose_form(form: str, family, config, lowering: str | None, backend: str) -> tuple[str, str | None]:
    """(form, why not ort) for a request; a family the ort form cannot serve fails an explicit --form ort."""
    reason = family.ort_form_reason(config)
    if form == "ort" and reason:
        raise RequestError(f"{family.model_type}: the ort form cannot serve this model: {reason}; build with --form portable")
    if form == "auto":
        if reason is None and lowering not in (None, "fused"):
            reason = f"--lowering {lowering} asked for the portable form"
        elif reason is None and backend == "trt":
            reason = "--backend trt builds engine.plan from the portable form"
        form = "portable" if reason else "ort"
        if reason:
            log.info("form: portable (%s)", reason)
    return form, (reason if form == "portable" else None)


def _has_tensorrt() -> bool:
    from .trt import compat

    return compat.find() is not None


def engine_builder(backend: str, lowering: str):
    """The TensorRT to build engine.plan with, or None to skip it; refuses before any work."""
    from .trt import compat

    if backend not in BUILD_BACKENDS:
        raise RequestError(f"unknown backend '{backend}'; choose one of {', '.join(BUILD_BACKENDS)}")
    if backend == "onnx" or (backend == "auto" and compat.find() is None):
        return None
    try:
        tensorrt = compat.load()
    except compat.TensorRTMissing as exc:
        if backend == "trt":
            raise
        log.warning("engine skipped: %s", exc)  # auto: an installed but broken TensorRT is reported, not fatal
        return None
    if lowering == "fused" and tensorrt.rtx:
        reason = "the fused lowering's MoE node needs moe-compile's TensorRT plugin, which tensorrt_rtx cannot run"
        if backend == "trt":
            raise RequestError(f"{reason}: build with --lowering auto, or install full tensorrt")
        log.warning("engine skipped: %s (--lowering auto builds one)", reason)
        return None
    return tensorrt


@dataclasses.dataclass
class CheckReference:
    """The torch program's logits on the check's sample inputs, taken before ONNX Runtime loads the build so that
    the torch side's weights can go first: a build's host peak then holds one copy of the weights, not both."""

    input_names: list[str]
    samples: list[functools.partial]  # each makes one sample's inputs (seeded: the same tensors at every call)
    expected: np.ndarray  # [positions, vocab] float32


def check_reference(manifest: Manifest, program, captured) -> CheckReference:
    """The lowered torch program on the check's samples: for the ort form a right-padded prefill of rows of
    different lengths, then a decode step. A sample is made when it runs and dropped after, not held: the ort form's
    caches are max_seq long, so each sample's are the size of the KV cache of its rows, all layers."""
    shapes, dtype = captured.kv_shapes, captured.dtype
    if manifest.form == "ort":
        lengths = [4, 2, 3][: max(2, min(3, manifest.max_batch))]  # the graph serves max(max_batch, 2) rows
        samples = [functools.partial(inplace_sample_inputs, shapes, dtype, len(lengths), lengths, manifest.max_seq,
                                     manifest.vocab_size, decode=decode) for decode in (False, True)]
    else:
        samples = [functools.partial(sample_inputs, shapes, dtype, 2, 4, 3, manifest.vocab_size)]
    step = logits_only(program.module(check_guards=False))
    with torch.no_grad():
        expected = [step(*make())[0].float().numpy() for make in samples]
    return CheckReference(captured.input_names, samples, np.concatenate([e.reshape(-1, e.shape[-1]) for e in expected]))


def logits_only(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The step with only its logits (the first output) computed: each layer's present, a copy of its cache in the
    ort form, then goes once its attention has run instead of every layer's living to the end of the step."""
    output = module.graph.output_node()
    outputs = output.args[0]
    output.args = ((outputs[0], *[None] * (len(outputs) - 1)),)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def check_build(out: Path, manifest: Manifest, reference: CheckReference) -> None:
    """The samples through ONNX Runtime against the torch program's logits."""
    from .quantize.exact import float_activations, qmoe_in_float, rounds_activations
    from .runtime.ort_backend import MissingKernelError, OrtBackend

    rounded = rounds_activations(manifest.quantization)

    class Unoptimised(OrtBackend):
        """Runs the graph as written. Optimised, ONNX Runtime's CPU provider would also fold fp32 copies of
        16-bit weights for kernels it has only in fp32: measured, 3.4 GB peak instead of 2.2 GB for 1.4 GB
        of fp16 weights (docs/BENCHMARKS.md). A build whose quantized ops round activations to int8 (quantized ort
        form) is checked with them on float activations (quantize/exact.py): its graph and packing exactly."""

        def session_options(self, options) -> None:
            import onnxruntime as ort

            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

        def model_source(self, options) -> str | bytes:
            return float_activations(self.out / ONNX_FILE, options) if rounded else super().model_source(options)

    try:
        with qmoe_in_float() if rounded else contextlib.nullcontext():
            backend = Unoptimised(out, manifest).activate()
    except MissingKernelError as exc:  # bf16, or fused on an ORT before 1.32, on the CPU: the ONNX is for other runtimes
        log.warning("check skipped: %s", exc)
        return
    expected = reference.expected
    feeds = ({name: a.numpy() for name, a in zip(reference.input_names, make())} for make in reference.samples)
    got = np.concatenate([backend.session.run(["logits"], sample)[0].astype(np.float32).reshape(-1, expected.shape[-1])
                          for sample in feeds])
    # NaN compares false with every tolerance: non-finite logits must fail on their own.
    for what, logits in (("the torch program", expected), ("ONNX Runtime", got)):
        if not np.isfinite(logits).all():
            raise MoeCompileError(f"check failed: {what} gives non-finite logits (NaN or inf) at "
                                  f"{int((~np.isfinite(logits)).any(axis=-1).sum())} of {len(logits)} positions: "
                                  "the checkpoint's weights hold NaN/inf, or the dtype overflows (try --dtype fp32)")
    scale = max(float(np.abs(expected).max()), 1e-6)
    errors = np.abs(got - expected).max(axis=-1).ravel() / scale  # per position
    # In 16 bits a near-tie in a router can pick another expert at one position: that is rounding,
    # not a wrong graph, which moves most positions.
    tolerance, allowed = (1e-4, 0) if manifest.dtype == "fp32" else (5e-2, 1)
    bad = int((errors > tolerance).sum())
    if bad > allowed:
        raise MoeCompileError(f"check failed: ONNX Runtime differs from the torch program at {bad} of "
                              f"{errors.size} positions (worst {errors.max():.2e} relative, tolerance {tolerance:g})")


def per_layer(name: str, by_path: dict[str, str], default):
    """The pass's entry for an experts module. Passes see paths from the captured root (the decoder
    step wrapping the model), the model names them from its own root: match the longest suffix."""
    hits = [path for path in by_path if path == name or path.endswith("." + name)]
    return by_path[max(hits, key=len)] if hits else default


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt")


def save_tokenizer(checkpoint: Path, target: Path, trust_remote_code: bool) -> str | None:
    """Copy the checkpoint's tokenizer into the build. A checkpoint without one builds quietly (prompts as
    token ids); one whose tokenizer files do not load gets a warning, and the reason is returned."""
    from transformers import AutoTokenizer

    if not any((checkpoint / name).is_file() for name in TOKENIZER_FILES) and not any(checkpoint.glob("*.tiktoken")):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    except Exception as exc:  # tokenizers raises plain Exceptions for a damaged tokenizer.json
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        log.warning("warning: the checkpoint's tokenizer does not load (%s); the build takes prompts as token ids only",
                    reason)
        return reason
    tokenizer.save_pretrained(target)
    return None


class _Stages:
    """Per-stage progress: a spinner while a stage runs, one line with its time when it ends."""

    def __init__(self, enabled: bool):
        from rich.console import Console

        self.console = Console(stderr=True) if enabled else None

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            if self.console is None:
                yield
                return
            with self.console.status(f"[bold]{name}[/bold] ..."):
                yield
        except Exception as exc:
            if not hasattr(exc, "moe_compile_stage"):
                exc.moe_compile_stage = name  # the CLI's net names the stage an unexpected error came from
            raise
        self.console.print(f"[green]✓[/green] {name:<8} {time.perf_counter() - start:6.1f} s")

    def note(self, line: str) -> None:
        if self.console is not None:
            self.console.print(f"  {line}")

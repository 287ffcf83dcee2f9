"""`moe-compile`: a thin front over the Python API; each subcommand is one call."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import warnings

from .errors import MoeCompileError

EPILOG = "MODEL is a hub id (org/name), a local HF checkpoint directory, or an embedded model: {embedded}."


def _parser() -> argparse.ArgumentParser:
    from .models.embedded import EMBEDDED
    from .build import FORMS
    from .passes import LOWERINGS
    from .passes.auto import DEFAULT_THRESHOLD
    from .runtime import BACKENDS

    parser = argparse.ArgumentParser(prog="moe-compile", description="Compile HuggingFace MoE models to ONNX and run them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each pass and stage in detail")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="compile a checkpoint into OUT (model.onnx, manifest.json, ...)",
                           epilog=EPILOG.format(embedded=", ".join(sorted(EMBEDDED))))
    build.add_argument("model", metavar="MODEL", help="hub id, local checkpoint directory or embedded model name")
    build.add_argument("-o", "--out", required=True, help="output directory (replaced atomically if it is a previous build)")
    dtype = build.add_mutually_exclusive_group()
    dtype.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights/activations dtype (default fp32)")
    for name in ("fp32", "fp16", "bf16"):
        dtype.add_argument(f"--{name}", dest="dtype", action="store_const", const=name, help=f"--dtype {name}")
    build.add_argument("--form", choices=FORMS, default="auto",
                       help="ort: ONNX Runtime's in-place form (fastest there); portable: past/present, standard ops, "
                            "TensorRT engines; auto (default): ort where the family has it")
    build.add_argument("--lowering", choices=LOWERINGS, default=None,
                       help="portable form: how the MoE experts are lowered (default auto)")
    build.add_argument("--auto-threshold", type=int, default=DEFAULT_THRESHOLD,
                       help=f"auto: largest token count that uses gather (default {DEFAULT_THRESHOLD})")
    build.add_argument("--max-batch", type=int, default=8, help="largest batch the build serves (default 8)")
    build.add_argument("--max-seq", type=int, default=None,
                       help="largest total sequence length, prompt + new tokens (default 2048, or the model's "
                            "max_position_embeddings if smaller)")
    build.add_argument("--force", action="store_true",
                       help="build even when the model's estimated memory exceeds what is available")
    build.add_argument("--trust-remote-code", action="store_true", help="allow code and pickle weights from the checkpoint (off by default)")
    build.add_argument("--backend", choices=["auto", "onnx", "trt"], default="auto",
                       help="trt: also build engine.plan (TensorRT required); onnx: skip it; auto (default): trt when "
                            "tensorrt or tensorrt_rtx is installed")
    build.add_argument("--timing-cache", metavar="PATH", help="TensorRT timing cache to reuse and update across builds")
    build.add_argument("--quantize", metavar="int8|int4",
                       help="weight-only quantization of experts, MLP and attention projections (RTN, symmetric, "
                            "per block; routers, gates, norms and embeddings keep --dtype; docs/QUANTIZATION.md)")
    build.add_argument("--block-size", type=int, default=None, help="--quantize: weights per scale along K (32, 64 or "
                                                                   "128; default 32)")
    build.add_argument("--quantize-lm-head", action="store_true", help="--quantize the LM head too")
    build.add_argument("--scales", metavar="absmax|mse", default=None,
                       help="--quantize: each block's scale from its largest weight (absmax, default) or the one that "
                            "rebuilds the block with the least squared error (mse: closer to fp32 at int4, slower build)")
    build.add_argument("--no-torch-program", dest="torch_program", action="store_false",
                       help="leave out program.pt2, the torch backends' input (a second copy of the weights)")

    run = sub.add_parser("run", help="generate from a build, streaming tokens")
    run.add_argument("out", metavar="OUT", help="a build output directory, or its engine.plan (runs with --backend trt)")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (needs the build's tokenizer)")
    source.add_argument("--input-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    source.add_argument("--chat", action="store_true", help="talk with a chat model in the terminal (/reset, /exit, Ctrl-D)")
    source.add_argument("--message", help="one chat turn: print the reply to this user message and exit")
    run.add_argument("--system", help="--chat/--message: the system message")
    run.add_argument("--max-new-tokens", type=int, default=None,
                     help="tokens to generate (default 64; chat: up to the end of the turn or the build's max_seq)")
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    run.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    run.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    run.add_argument("--backend", choices=sorted(BACKENDS), help="runtime backend (default ort; trt for a .plan)")
    _cuda_graph_flag(run)

    verify = sub.add_parser("verify", help="compare a build with transformers eager; non-zero exit on mismatch")
    verify.add_argument("out", metavar="OUT", help="a build output directory")
    verify.add_argument("--model", help="reference checkpoint (default: the build's source)")
    verify.add_argument("--backend", choices=sorted(BACKENDS), default="ort", help="runtime backend (default ort)")
    verify.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to compare (default 32)")
    _cuda_graph_flag(verify)

    bench = sub.add_parser("bench", help="prefill latency, decode tokens/s, peak memory and the decode floor "
                                         "(bytes a step reads / measured copy bandwidth) of a build")
    bench.add_argument("out", metavar="OUT", help="a build output directory")
    bench.add_argument("--backend", choices=sorted(BACKENDS), default="ort", help="runtime backend (default ort)")
    bench.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1), e.g. 1,8,32")
    bench.add_argument("--prompt-len", default="128", help="comma-separated prompt lengths (default 128), e.g. 128,2048")
    bench.add_argument("--new-tokens", type=int, default=128, help="greedy decode steps timed per setting (default 128)")
    bench.add_argument("--repeats", type=int, default=3, help="timed prefills per setting, median reported (default 3)")
    _cuda_graph_flag(bench)
    bench.add_argument("--json", action="store_true", help="print one machine-readable JSON record instead of the table")

    inspect = sub.add_parser("inspect", help="print a build's manifest, ONNX inputs/outputs and op histogram")
    inspect.add_argument("out", metavar="OUT", help="a build output directory, or its engine.plan")

    families = sub.add_parser("families", help="list the supported model families")
    families.add_argument("--markdown", action="store_true", help="print the docs' table (README.md, docs/FAMILIES.md)")
    sub.add_parser("passes", help="list the registered passes")
    sub.add_parser("doctor", help="versions, ONNX Runtime providers, GPU, and which backends and build forms run here")
    return parser


def _cuda_graph_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                        help="ort-cuda on an ort-form build: run decode steps uncaptured (CUDA graphs are on by default)")


class _Stderr(logging.StreamHandler):
    """Log records go to sys.stderr as it is when each record comes, not as it was at the first call: a caller
    that redirects or captures stderr between calls of main() (tests, embedding) never meets a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    command = "start-up"
    try:
        args = _parser().parse_args(argv)
        command = args.command
        logging.basicConfig(format="%(message)s", level=logging.WARNING, handlers=[_Stderr()])
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch/transformers internals, not the user's
        warnings.filterwarnings("ignore", category=FutureWarning)
        logging.getLogger("moe_compile").setLevel(logging.INFO if args.verbose else logging.WARNING)
        return COMMANDS[args.command](args) or 0
    except MoeCompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, and SIGTERM/SIGHUP during a build (build_dir.py)
        print("interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signal", signal.SIGINT)
    except BrokenPipeError:  # `moe-compile run ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 128 + signal.SIGPIPE
    except Exception as exc:  # the net under the known failures: one line, never a bare traceback
        if os.environ.get("MOE_COMPILE_DEBUG") == "1":
            raise
        stage = getattr(exc, "moe_compile_stage", command)
        if isinstance(exc, MemoryError):
            print(f"error: out of memory in {stage}; a smaller --max-seq or --max-batch, or more memory",
                  file=sys.stderr)
            return 1
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: internal error in {stage}: {type(exc).__name__}: {message[:300]} "
              "(MOE_COMPILE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def _build(args) -> None:
    from .build import build

    start = time.perf_counter()
    out = build(args.model, args.out, dtype=args.dtype, lowering=args.lowering, form=args.form, max_batch=args.max_batch,
                max_seq=args.max_seq, trust_remote_code=args.trust_remote_code, auto_threshold=args.auto_threshold,
                backend=args.backend, timing_cache=args.timing_cache, torch_program=args.torch_program,
                quantize=args.quantize, block_size=args.block_size, quantize_lm_head=args.quantize_lm_head,
                scales=args.scales, force=args.force)
    print(f"built {out} in {time.perf_counter() - start:.1f} s")


def _run(args) -> None:
    from .api import load
    from .errors import RequestError
    from .terminal import TextStream, chat, messages

    if args.system is not None and not (args.chat or args.message is not None):
        raise RequestError("--system is the chat's system message: give it with --chat or --message")
    if args.message is not None and not args.message.strip():
        raise RequestError("empty message: give some text")
    out, backend = _target(args.out, args.backend)
    model = load(out, backend, args.cuda_graph)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.chat:
        return chat(model, args.system, args.max_new_tokens, options)
    stream = TextStream(model)
    if args.message is not None:
        model.chat(messages(args.system, args.message), args.max_new_tokens, stream, **options)
    else:
        prompt = args.prompt if args.prompt is not None else _token_ids(args.input_ids)
        new_tokens = 64 if args.max_new_tokens is None else args.max_new_tokens
        model.generate([prompt], max_new_tokens=new_tokens, stream=stream, **options)
    stream.finish()
    stats = model.last_stats
    print(f"[{backend}] prefill {stats.prefill_ms:.1f} ms, decode {stats.decode_tokens_per_s:.1f} tokens/s, "
          f"{stats.new_tokens} new tokens", file=sys.stderr)


def _target(path: str, backend: str | None) -> tuple[str, str]:
    """OUT or OUT/engine.plan -> (OUT, backend): a plan runs with TensorRT, from the manifest beside it."""
    from pathlib import Path

    from .errors import ArtifactError, RequestError
    from .export.manifest import MANIFEST

    if not path.endswith(".plan"):
        return path, backend or "ort"
    plan = Path(path)
    if not plan.is_file():
        raise ArtifactError(f"{plan} does not exist")
    if not (plan.parent / MANIFEST).is_file():
        raise ArtifactError(f"{plan} has no {MANIFEST} beside it: a plan runs only with the manifest (and tokenizer) "
                            "that 'moe-compile build' wrote with it; rebuild, or copy the whole build directory")
    if backend not in (None, "trt"):
        raise RequestError(f"{plan} is a TensorRT engine: run it with --backend trt, or give the directory for --backend {backend}")
    return str(plan.parent), "trt"


def _token_ids(text: str) -> list[int]:
    from .errors import RequestError

    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise RequestError(f"--input-ids must be comma-separated integers, got '{text}'") from None
    if not ids:
        raise RequestError("empty prompt: --input-ids has no token ids")
    return ids


def _verify(args) -> int:
    from .verify import verify

    report = verify(args.out, model=args.model, new_tokens=args.new_tokens, backend=args.backend, cuda_graph=args.cuda_graph)
    print("\n".join(report.lines()))
    return 0 if report.passed else 1


def _bench(args) -> None:
    import json

    from .runtime.benchmark import bench, table

    batches, prompt_lens = _int_list(args.batch, "--batch"), _int_list(args.prompt_len, "--prompt-len")
    record = bench(args.out, args.backend, batches, prompt_lens, args.new_tokens, args.repeats, cuda_graph=args.cuda_graph)
    print(json.dumps(record, indent=2) if args.json else "\n".join(table(record)))


def _int_list(text: str, flag: str) -> list[int]:
    from .errors import RequestError

    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise RequestError(f"{flag} must be comma-separated integers, got '{text}'") from None
    if not values:
        raise RequestError(f"{flag} is empty")
    return values


def _inspect(args) -> None:
    import collections
    import json

    import onnx

    from .export.manifest import ONNX_FILE, read_manifest

    out, _ = _target(args.out, None)
    manifest = read_manifest(out, check=True)
    print(json.dumps(manifest.model_dump(exclude={"inputs", "outputs", "engine"}), indent=2))
    for kind, values in (("input", manifest.inputs), ("output", manifest.outputs)):
        for value in values:
            print(f"{kind:6} {value['name']:32} {value['dtype']:8} {value['shape']}")
    graph = onnx.load(f"{out}/{ONNX_FILE}", load_external_data=False).graph
    histogram = collections.Counter(node.op_type for node in graph.node)
    print("ops: " + ", ".join(f"{op} {n}" for op, n in histogram.most_common()))
    if manifest.quantization:
        from .quantize import bytes_table

        print("\n".join(bytes_table(manifest.quantization)))
    if manifest.engine:
        from .trt.inspect import describe

        print("\n".join(describe(out, manifest)))


def _families(args) -> None:
    from .models import FAMILIES
    from .models.spec import families_table

    if args.markdown:
        print(families_table(), end="")
        return
    for name, spec in sorted(FAMILIES.items()):
        print(f"{name:17} routing={spec.routing.value:19} attention={spec.attention:25} shared_expert={spec.shared_expert}")


def _passes(_args) -> None:
    from .passes import list_passes

    for name, description in list_passes().items():
        print(f"{name:8} {description}")


def _doctor(_args) -> None:
    from .doctor import report

    print("\n".join(report()))


COMMANDS = {"build": _build, "run": _run, "verify": _verify, "inspect": _inspect, "bench": _bench, "families": _families, "passes": _passes,
            "doctor": _doctor}

if __name__ == "__main__":
    sys.exit(main())

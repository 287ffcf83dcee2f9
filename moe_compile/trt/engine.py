"""OUT/model.onnx -> OUT/engine.plan, in small steps (Polygraphy's loaders, as functions):

    network_from_onnx  parse into a strongly typed network; a parser error names the node and op
    build_plan         two optimization profiles (profiles.py), timing cache, serialized engine
    build_engine       both, writes engine.plan, returns the manifest's `engine` record

`tensor_io` describes a network's or an engine's inputs/outputs in one form and `io_mismatch`
compares it with manifest.json: the CI tests check the network every engine is built from, the
TensorRT backend checks the deserialized engine before it runs it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import onnx

from ..errors import ArtifactError, MoeCompileError
from ..export.manifest import ONNX_FILE
from . import compat, profiles
from .precision import fp32_islands

log = logging.getLogger("moe_compile")

ENGINE_FILE = "engine.plan"
FUSED_OP = "MoE"  # the fused lowering's node: a TensorRT plugin (moe_compile/plugins/trt_plugin.py)
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
           "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}


class EngineBuildError(MoeCompileError):
    """TensorRT could not parse the ONNX or build an engine from it."""


def collecting_logger(t: compat.TensorRT):
    """A TensorRT logger that keeps errors (for one-line messages) and sends the rest to our log."""

    class Logger(t.trt.ILogger):
        def __init__(self):
            t.trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, message):
            if int(severity) <= int(t.trt.ILogger.Severity.ERROR):
                self.errors.append(" ".join(message.split()))
            elif severity == t.trt.ILogger.Severity.WARNING:
                log.debug("[%s] %s", t.package, message)

        def first_error(self, default: str) -> str:
            return self.errors[0][:400] if self.errors else default

    return Logger()


def uses_fused_op(onnx_path: Path) -> bool:
    return any(n.op_type == FUSED_OP for n in onnx.load(str(onnx_path), load_external_data=False).graph.node)


def network_from_onnx(t: compat.TensorRT, onnx_path: Path, logger):
    """(builder, network, parser): the parser must outlive the network (it owns the weights)."""
    if uses_fused_op(onnx_path):
        if t.rtx:
            raise EngineBuildError(
                f"{onnx_path} has fused MoE nodes, which need moe-compile's TensorRT plugin: full tensorrt runs "
                "it, tensorrt_rtx cannot (Python plugins abort it); build with --lowering auto, or --backend onnx")
        from ..plugins.trt_plugin import register

        register()
    builder = t.trt.Builder(logger)
    network = t.network(builder)
    parser = t.trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        if not errors:
            raise EngineBuildError(f"{t.describe()} could not parse {onnx_path}: {logger.first_error('no reason given')}")
        e = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise EngineBuildError(f"{t.describe()} ONNX parser: node '{e.node_name()}' ({e.node_operator()}) in "
                               f"{onnx_path.name}: {' '.join(e.desc().split())}{more}; --backend onnx skips the engine")
    return builder, network, parser


def tensor_io(t: compat.TensorRT, source) -> dict[str, dict]:
    """{name: {mode, dtype, shape}} of a network's or an engine's I/O tensors (-1 = dynamic dim)."""
    if hasattr(source, "num_io_tensors"):  # ICudaEngine
        names = [source.get_tensor_name(i) for i in range(source.num_io_tensors)]
        return {n: _tensor(t.trt.TensorIOMode.INPUT == source.get_tensor_mode(n), source.get_tensor_dtype(n),
                           source.get_tensor_shape(n)) for n in names}
    tensors = [(True, source.get_input(i)) for i in range(source.num_inputs)]
    tensors += [(False, source.get_output(i)) for i in range(source.num_outputs)]
    return {x.name: _tensor(is_input, x.dtype, x.shape) for is_input, x in tensors}


def _tensor(is_input: bool, dtype, shape) -> dict:
    return {"mode": "input" if is_input else "output", "dtype": _DTYPES.get(dtype.name, dtype.name), "shape": list(shape)}


def io_mismatch(io: dict[str, dict], manifest) -> str | None:
    """How TensorRT's I/O differs from the manifest's (names, modes, dtypes, fixed and dynamic dims), or None."""
    expected = {v["name"]: {"mode": mode, "dtype": v["dtype"], "shape": [d if isinstance(d, int) else -1 for d in v["shape"]]}
                for mode, values in (("input", manifest.inputs), ("output", manifest.outputs)) for v in values}
    for name in expected.keys() - io.keys():
        return f"the engine has no {expected[name]['mode']} '{name}' that manifest.json lists"
    for name in io.keys() - expected.keys():
        return f"the engine has {io[name]['mode']} '{name}' that manifest.json does not list"
    for name, want in expected.items():
        for field in ("mode", "dtype", "shape"):
            if io[name][field] != want[field]:
                return f"'{name}' is {field} {io[name][field]} in the engine but {want[field]} in manifest.json"
    return None


def build_plan(t: compat.TensorRT, builder, network, manifest, timing_cache: Path | None, logger) -> bytes:
    config = builder.create_builder_config()
    shapes = profiles.profile_shapes(manifest)
    for name in profiles.PROFILES:
        profile = builder.create_optimization_profile()
        for tensor, (low, opt, high) in shapes[name].items():
            profile.set_shape(tensor, low, opt, high)
        if config.add_optimization_profile(profile) < 0:
            raise EngineBuildError(f"{t.describe()} refused the {name} profile: {logger.first_error('invalid shapes')}")
    # Layer names, types and precisions in the plan, for `moe-compile inspect` (a few KB).
    config.profiling_verbosity = t.trt.ProfilingVerbosity.DETAILED
    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, False)  # False: refuse a cache from another TensorRT/GPU
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{t.describe()} could not build an engine: {logger.first_error('no reason given')}; "
                               "--backend onnx skips the engine")
    if cache is not None:
        _write(timing_cache, memoryview(config.get_timing_cache().serialize()))
    return plan


def build_engine(out: Path, manifest, t: compat.TensorRT, timing_cache: Path | None = None,
                 plan_path: Path | None = None) -> dict:
    """Build OUT's engine and write it to `plan_path` (default OUT/engine.plan); returns the manifest's
    `engine` record."""
    out = Path(out)
    onnx_path, plan_path = out / ONNX_FILE, plan_path or out / ENGINE_FILE
    if timing_cache is not None and not t.has_timing_cache:
        log.warning("%s has no timing cache (its builder times nothing ahead of time): --timing-cache %s is not used",
                    t.package, timing_cache)
        timing_cache = None
    logger = collecting_logger(t)
    start = time.perf_counter()
    builder, network, _parser = network_from_onnx(t, onnx_path, logger)
    mismatch = io_mismatch(tensor_io(t, network), manifest)
    if mismatch:
        raise ArtifactError(f"{onnx_path} does not match its manifest.json: {mismatch}; rebuild")
    plan = build_plan(t, builder, network, manifest, timing_cache, logger)
    size = _write(plan_path, memoryview(plan))
    return {
        "file": ENGINE_FILE,
        "package": t.package,
        "version": t.version,
        "precision": manifest.dtype,
        "strongly_typed": True,
        "fp32_ops": fp32_islands(onnx_path) if manifest.dtype != "fp32" else {},
        "profiles": profiles.profile_shapes(manifest),
        "gpu": _gpu() if not t.rtx else None,
        "timing_cache": str(timing_cache) if timing_cache else None,
        "build_seconds": round(time.perf_counter() - start, 2),
        "bytes": size,
    }


def _write(path: Path, data: memoryview) -> int:
    """Write through a temporary sibling: a failure leaves no half-written file under the final name."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return data.nbytes


def _gpu() -> dict | None:
    """Full TensorRT builds on (and for) the current GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "capability": f"{major}.{minor}"}


def engine_from_plan(out: Path, manifest):
    """(TensorRT, ICudaEngine) for OUT's plan, after every check that can fail with a clear reason:
    the TensorRT package and release that built it, the plan's size, the GPU, the engine's I/O and
    profiles against manifest.json."""
    record = manifest.engine
    if not record:
        raise ArtifactError(f"{out} has no {ENGINE_FILE}: rebuild with 'moe-compile build ... --backend trt'")
    path = Path(out) / record["file"]
    if record.get("package") not in compat.PACKAGES:
        raise ArtifactError(f"manifest.json names an unknown TensorRT package {record.get('package')!r}; rebuild")
    try:
        t = compat.load(record["package"])
    except compat.TensorRTMissing as exc:
        raise compat.CannotRun(f"{path.name} was built by {record['package']} {record['version']} "
                               f"({compat.GPUS[record['package']]}): {exc}") from None
    t.check_record(record, path.stat().st_size)
    t.check_gpu(record)
    logger = collecting_logger(t)
    runtime = t.trt.Runtime(logger)
    data = path.read_bytes()
    t.check_plan(runtime, data)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ArtifactError(f"{t.describe()} cannot load {path}: {logger.first_error('corrupt plan')}")
    mismatch = io_mismatch(tensor_io(t, engine), manifest)
    if mismatch:
        raise ArtifactError(f"{path} does not match manifest.json: {mismatch}; rebuild")
    for index, name in enumerate(profiles.PROFILES):
        for tensor, shapes in record["profiles"][name].items():
            got = [list(s) for s in engine.get_tensor_profile_shape(tensor, index)]
            if got != shapes:
                raise ArtifactError(f"{path}: the {name} profile of '{tensor}' is {got}, manifest.json says {shapes}")
    return t, engine

"""TensorRT plugin for the fused MoE node: a Python-implemented IPluginV3 (full TensorRT >= 10)
around the same C launcher the torch binding calls (csrc/fused_moe.h, through library.py).

TensorRT's ONNX parser, meeting an op it has no importer for, looks a plugin up by the node's
op_type, version "1" and namespace "" (node attributes `plugin_version`/`plugin_namespace`
override them) and hands it the node's attributes as plugin fields. Our fused node is
`com.microsoft:MoE` (export/fused_moe_onnx.py), so the creator registers as "MoE", version "1".

    register()   # once per process, before parsing the ONNX

The TensorRT-facing class is thin: shape and type inference, format support, serialised
attributes, enqueue -> `MoeLaunch.enqueue`. Everything below it (attribute parsing and checks,
workspace layout, the launch itself) is plain Python over the C ABI, tested without TensorRT.
Not run here: no full TensorRT can be installed on these machines (docs/FUSED_MOE.md).

What the kernels serve: activation_type "swiglu" with alpha 1, beta 0 and no limit (SiLU(gate)*up),
swiglu_fusion 1 (interleaved rows: the kernels read that layout directly), no biases, no FC3, no
sparse mixer, fp32/fp16/bf16. Anything else is refused when TensorRT creates the plugin, with
the reason: build that layer with `--lowering auto` instead.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from . import library
from .library import Dtype, GateUpLayout, Routing, RoutingKind

PLUGIN_NAME = "MoE"  # the ONNX op_type of the fused node
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
ALIGN = 256


class PluginError(ValueError):
    """The MoE node asks for something our kernels do not compute."""


def decode_field(data) -> object:
    """A plugin field's value: CHAR fields are bytes (strings), numeric ones a 1-element array."""
    array = np.asarray(data)
    if array.dtype in (np.int8, np.uint8) or array.dtype.kind in "SU":
        return bytes(array.astype(np.uint8).tobytes()).split(b"\0")[0].decode()
    return array.reshape(-1)[0].item() if array.size == 1 else array.tolist()


@dataclasses.dataclass(frozen=True)
class MoeAttributes:
    """com.microsoft:MoE attributes, with the op's own defaults (onnxruntime 1.32 schema)."""

    k: int = 1
    normalize_routing_weights: int = 0
    activation_type: str = "relu"
    swiglu_fusion: int = 0
    activation_alpha: float = 1.0
    activation_beta: float = 0.0
    swiglu_limit: float | None = None
    use_sparse_mixer: int = 0

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> MoeAttributes:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {name: decode_field(value) for name, value in fields.items() if name in known}
        return cls(**values)

    def check(self) -> None:
        problems = []
        if self.activation_type != "swiglu" or (self.activation_alpha, self.activation_beta) != (1.0, 0.0):
            problems.append(f"activation {self.activation_type} (alpha {self.activation_alpha}, beta "
                            f"{self.activation_beta}); the kernels compute SiLU(gate)*up: swiglu, alpha 1, beta 0")
        if self.swiglu_limit is not None:
            problems.append(f"swiglu_limit {self.swiglu_limit} (the kernels do not clamp)")
        if self.swiglu_fusion != 1:
            problems.append(f"swiglu_fusion {self.swiglu_fusion} (only 1, interleaved gate/up rows)")
        if self.use_sparse_mixer:
            problems.append("use_sparse_mixer (softmax top-k routing only)")
        if not 1 <= self.k <= 32:
            problems.append(f"k {self.k} (1..32)")
        if problems:
            raise PluginError("MoE plugin: unsupported " + "; ".join(problems) + "; build with --lowering auto")

    @property
    def routing(self) -> Routing:
        return Routing(RoutingKind.SOFTMAX_TOPK, self.k, bool(self.normalize_routing_weights))

    def serialize(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def deserialize(cls, data: bytes) -> MoeAttributes:
        return cls(**json.loads(bytes(data).decode()))


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclasses.dataclass(frozen=True)
class MoeLaunch:
    """One call's problem: T tokens of hidden H, E experts of intermediate I, one dtype."""

    attributes: MoeAttributes
    tokens: int
    hidden: int
    intermediate: int
    experts: int
    dtype: Dtype

    @classmethod
    def from_shapes(cls, attributes: MoeAttributes, shapes: list[tuple[int, ...]], dtype: Dtype) -> MoeLaunch:
        """shapes: input [..., H], router_probs [T, E], fc1 [E, 2I, H], fc2 [E, H, I] (empty optional
        inputs dropped; a bias or FC3 input is refused)."""
        if len(shapes) != 4:
            raise PluginError(f"MoE plugin: {len(shapes)} inputs; only input, router_probs, fc1 and fc2 weights "
                              "are supported (no biases, no FC3)")
        x, router, fc1, fc2 = shapes
        tokens = int(np.prod(x[:-1]))
        experts, two_i, hidden = fc1
        if (router[0], router[-1]) != (tokens, experts) or tuple(fc2) != (experts, hidden, two_i // 2) or x[-1] != hidden:
            raise PluginError(f"MoE plugin: shapes {shapes} do not fit [T,H], [T,E], [E,2I,H], [E,H,I]")
        return cls(attributes, tokens, hidden, two_i // 2, experts, dtype)

    def shape(self) -> library._Shape:
        return library.shape_c(self.tokens, self.hidden, self.intermediate, self.experts, self.dtype,
                               GateUpLayout.INTERLEAVED)

    def workspace_bytes(self) -> int:
        """fp32 router logits, then the launcher's own workspace."""
        return _aligned(self.tokens * self.experts * 4) + library.workspace_size(self.shape(), self.attributes.routing)

    def enqueue(self, hidden: int, router: int, fc1: int, fc2: int, out: int, workspace: int, stream: int) -> None:
        logits = workspace
        library.to_float(router, self.dtype, logits, self.tokens, self.experts, stream)
        offset = _aligned(self.tokens * self.experts * 4)
        size = library.workspace_size(self.shape(), self.attributes.routing)
        library.forward(self.shape(), self.attributes.routing, hidden, logits, None, fc1, fc2, out,
                        workspace + offset, size, stream)


def _trt():
    import tensorrt

    return tensorrt


def _dtype(trt, data_type) -> Dtype:
    return {trt.DataType.FLOAT: Dtype.F32, trt.DataType.HALF: Dtype.F16, trt.DataType.BF16: Dtype.BF16}[data_type]


def make_plugin_classes():
    """The IPluginV3 and its creator, defined against the installed `tensorrt` module."""
    trt = _trt()

    class MoePlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, attributes: MoeAttributes):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            attributes.check()
            self.attributes = attributes
            self.num_outputs = 1
            self.plugin_name, self.plugin_version, self.plugin_namespace = PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE

        def get_capability_interface(self, kind):
            return self

        def clone(self):
            return MoePlugin(self.attributes)

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0])]  # same shape as the input

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 0:
                return desc.type in (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16)
            return desc.type == in_out[0].desc.type  # router, weights and output: the input's type

        def configure_plugin(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            shapes = [tuple(d.max) for d in inputs]
            return MoeLaunch.from_shapes(self.attributes, shapes, _dtype(trt, inputs[0].desc.type)).workspace_bytes()

        def on_shape_change(self, inputs, outputs):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def set_tactic(self, tactic):
            pass

        def get_fields_to_serialize(self):
            data = np.frombuffer(self.attributes.serialize(), dtype=np.int8)
            return trt.PluginFieldCollection([trt.PluginField("moe_compile", data, trt.PluginFieldType.CHAR)])

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            shapes = [tuple(d.dims) for d in input_desc]
            launch = MoeLaunch.from_shapes(self.attributes, shapes, _dtype(trt, input_desc[0].type))
            launch.enqueue(inputs[0], inputs[1], inputs[2], inputs[3], outputs[0], workspace, stream)
            return 0

    class MoePluginCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE
            self.field_names = trt.PluginFieldCollection([])

        def create_plugin(self, name, fields, phase):
            values = {f.name: f.data for f in fields}
            if "moe_compile" in values:  # an engine's serialised plugin
                return MoePlugin(MoeAttributes.deserialize(np.asarray(values["moe_compile"]).tobytes()))
            return MoePlugin(MoeAttributes.from_fields(values))  # an ONNX node's attributes

    return MoePlugin, MoePluginCreator


_registered = None


def register():
    """Register the creator in TensorRT's plugin registry (idempotent); returns it."""
    global _registered
    if _registered is None:
        _, creator_class = make_plugin_classes()
        _registered = creator_class()
        _trt().get_plugin_registry().register_creator(_registered, PLUGIN_NAMESPACE)
    return _registered

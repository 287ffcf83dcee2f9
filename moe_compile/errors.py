"""One exception root: every message names what is wrong and what to do about it."""


class MoeCompileError(Exception):
    """Any error moe-compile reports to the user (the CLI prints it as one line, exit 1)."""


class UnsupportedModelError(MoeCompileError):
    """The checkpoint's architecture or layout is not one moe-compile can compile."""


class CheckpointError(MoeCompileError):
    """The checkpoint cannot be found, fetched or loaded safely."""


class ArtifactError(MoeCompileError):
    """A build output (OUT directory, manifest.json, model.onnx) is missing, corrupt or mismatched."""


class RequestError(MoeCompileError):
    """A generation request is invalid (empty prompt, too long, bad sampling values)."""

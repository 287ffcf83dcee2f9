"""The engine's two optimization profiles, derived from the manifest, and the choice between them per step.

    prefill  batch 1..B   new tokens 1..L   past 0          (a prompt into an empty cache)
    decode   batch 1..B   new tokens 1      past 0..L-1     (one token per row onto the cache)

B and L are the build's --max-batch and --max-seq. Each input's dims are named in the manifest
(`batch_size`, `sequence_length`, `past_sequence_length`, `total_sequence_length` = past + new);
fixed dims (heads, head_dim) stay as they are. Both profiles share the engine's one copy of the
weights: a profile only selects kernels for its range of shapes.
"""

from __future__ import annotations

from ..errors import ArtifactError, RequestError

PREFILL, DECODE = "prefill", "decode"
PROFILES = (PREFILL, DECODE)  # engine profile index = position here
# The shapes TensorRT tunes each profile for: a medium prompt at batch 1, a half-full cache at batch 1.
PREFILL_OPT_TOKENS = 128


def dim_ranges(max_batch: int, max_seq: int) -> dict[str, dict[str, tuple[int, int, int]]]:
    """(min, opt, max) of each named dim, per profile."""
    prompt = min(PREFILL_OPT_TOKENS, max_seq)
    half = max_seq // 2
    batch = (1, 1, max_batch)
    return {
        PREFILL: {"batch_size": batch, "sequence_length": (1, prompt, max_seq), "past_sequence_length": (0, 0, 0),
                  "total_sequence_length": (1, prompt, max_seq)},
        DECODE: {"batch_size": batch, "sequence_length": (1, 1, 1), "past_sequence_length": (0, half, max_seq - 1),
                 "total_sequence_length": (1, half + 1, max_seq)},
    }


def profile_shapes(manifest) -> dict[str, dict[str, list[list[int]]]]:
    """{profile: {input name: [min shape, opt shape, max shape]}} for every input of the manifest."""
    ranges = dim_ranges(manifest.max_batch, manifest.max_seq)
    shapes: dict[str, dict[str, list[list[int]]]] = {}
    for profile, dims in ranges.items():
        shapes[profile] = {}
        for value in manifest.inputs:
            unknown = [d for d in value["shape"] if isinstance(d, str) and d not in dims]
            if unknown:
                raise ArtifactError(f"input {value['name']} has dim '{unknown[0]}' that no optimization profile "
                                    f"covers (known: {', '.join(dims)}); rebuild with this moe-compile")
            shapes[profile][value["name"]] = [
                [dims[d][i] if isinstance(d, str) else d for d in value["shape"]] for i in range(3)
            ]
    return shapes


def pick(profiles: dict[str, dict[str, list[list[int]]]], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose [min, max] holds every input shape of this step, else a
    RequestError naming the bounds. The decode loop's steps always fit: a prompt into an empty cache
    (prefill), then one token per row (decode)."""
    for index, name in enumerate(PROFILES):
        bounds = profiles[name]
        if all(all(lo <= d <= hi for d, lo, hi in zip(shape, bounds[n][0], bounds[n][2])) for n, shape in shapes.items()):
            return index
    batch, new = shapes["input_ids"]
    past = shapes["attention_mask"][1] - new
    raise RequestError(
        f"a step of batch {batch} with {new} new tokens after {past} cached ones fits neither engine profile: "
        f"prefill takes 1..{profiles[PREFILL]['input_ids'][2][1]} tokens into an empty cache, decode one token "
        f"per row onto up to {profiles[DECODE]['attention_mask'][2][1] - 1} cached ones"
    )

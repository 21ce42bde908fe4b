"""What the bytes mean: logical dtypes, their stored representation, checksums, records.

Nothing here knows about Zarr or HDF5. Both backends store the same things:
bfloat16/float16 as their raw 16-bit patterns in uint16 (neither format has
bfloat16), float32 as float32, always little-endian, so the reader hands back
the exact tensor capture saw.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UsageError

FORMAT = "coala-stream/activations"
# 2: chunk checksums in an append-only array beside the data instead of a JSON list in the
# input's attributes (a commit rewrote the whole list: quadratic in the chunks); one
# attribute (`committed_tokens`) is the commit record of an input. Version 1 stores are read.
FORMAT_VERSION = 2

# logical dtype name -> (torch dtype, numpy dtype stored on disk)
LOGICAL_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),
    "float16": (torch.float16, np.dtype("<u2")),
    "float32": (torch.float32, np.dtype("<f4")),
}


def check_dtype_name(name: str) -> str:
    """`name` if it is a logical dtype the store can hold, else UsageError."""
    if name not in LOGICAL_DTYPES:
        raise UsageError(
            f"store dtype must be one of {sorted(LOGICAL_DTYPES)}, got {name!r}; "
            "pass --dtype bfloat16, float16 or float32"
        )
    return name


def torch_dtype(name: str) -> torch.dtype:
    return LOGICAL_DTYPES[check_dtype_name(name)][0]


def stored_dtype(name: str) -> np.dtype:
    return LOGICAL_DTYPES[check_dtype_name(name)][1]


def to_stored(t: torch.Tensor) -> np.ndarray:
    """(rows x n) tensor -> C-contiguous little-endian array of its stored representation.

    A view where possible (no copy for a contiguous CPU tensor): 16-bit floats are
    reinterpreted as uint16, never converted, so every bit survives.
    """
    t = t.detach().to("cpu").contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)  # same bits; numpy has no bfloat16, and int16 converts everywhere
        return t.numpy().view(np.dtype("<u2"))
    return np.ascontiguousarray(t.numpy(), dtype=np.dtype("<f4"))


def from_stored(a: np.ndarray, dtype_name: str) -> torch.Tensor:
    """Inverse of `to_stored`: stored array -> tensor in the logical dtype (same bits)."""
    a = np.ascontiguousarray(a, dtype=stored_dtype(dtype_name))
    if dtype_name == "float32":
        return torch.from_numpy(a)
    return torch.from_numpy(a.view(np.int16)).view(torch_dtype(dtype_name))


def crc32(a: np.ndarray) -> int:
    """zlib crc32 of the raw little-endian bytes of a stored chunk (what `chunk_crc32` holds)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B")) & 0xFFFFFFFF


def num_chunks(tokens: int, chunk_tokens: int) -> int:
    return math.ceil(tokens / chunk_tokens)


@dataclass(frozen=True)
class InputInfo:
    """One stored input as the reader sees it (committed data only).

    Chunk i holds rows [i * chunk_tokens, min((i + 1) * chunk_tokens, tokens)).
    """

    name: str
    consumers: list[str]
    n: int
    tokens: int
    dtype: torch.dtype
    chunk_tokens: int
    num_chunks: int
    chunk_crc32: list[int] = field(repr=False)
    # A pair input (issue 17's output objective) stores [Xh | X] side by side: the layer's
    # inputs in the compressed model, then the same tokens' inputs in the original model.
    pair: bool = False
    # A narrow pair (issue 25) stores [Xh | X W_g^T] instead: W_g the consumers' original
    # weights stacked in consumer order; these are their output widths (None: [Xh | X]).
    outputs: tuple[int, ...] | None = None
    # chunks [0, dropped) were deleted after reduce had folded them (capture --drop-activations)
    dropped: int = 0

    @property
    def features(self) -> int:
        """Input features of the consumers (n; n / 2 for a pair input, n - sum(outputs) for a
        narrow one)."""
        if self.outputs is not None:
            return self.n - sum(self.outputs)
        return self.n // 2 if self.pair else self.n

    def narrow(self, consumer: str) -> tuple[tuple[int, ...], slice] | None:
        """(outputs, the columns of ``consumer``'s outputs among them) for a narrow pair, as
        `objective.OutputProblem` takes them; None for any other input."""
        if self.outputs is None:
            return None
        i = self.consumers.index(consumer)
        start = sum(self.outputs[:i])
        return self.outputs, slice(start, start + self.outputs[i])

    def chunk_rows(self, i: int) -> tuple[int, int]:
        """Row range [start, stop) of committed chunk i."""
        return i * self.chunk_tokens, min((i + 1) * self.chunk_tokens, self.tokens)


def fingerprint(uuid: str, info: InputInfo, upto: int) -> str:
    """sha256 over the store's identity and the crc32s of chunks [0, upto) of one input.

    Equal fingerprints mean the same bytes were (or would be) folded, in the same
    chunking; any changed, added or reordered chunk changes it.
    """
    ident = {
        "uuid": uuid,
        "name": info.name,
        "n": info.n,
        "dtype": str(info.dtype).removeprefix("torch."),
        "chunk_tokens": info.chunk_tokens,
        "chunks": upto,
        "tokens": min(upto * info.chunk_tokens, info.tokens),
        "crc32": info.chunk_crc32[:upto],
    }
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()

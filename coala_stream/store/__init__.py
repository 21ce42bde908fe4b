"""The activation store: calibration inputs on disk, lossless, compressed, crash-safe.

A Zarr v3 directory (default) or one HDF5 file with the same logical layout
(docs/design.md, "The store"):

    STORE/zarr.json           root attributes: format, model, calibration, dtype, chunk_tokens, capture, uuid
    STORE/inputs/<name>       (tokens x n) uint16 bit patterns of bf16/fp16, or float32;
                              attributes consumers, logical_dtype, order, committed_tokens, chunk_crc32
    STORE/crc32/<name>        format 2: the chunks' crc32s (HDF5: the /crc32/<name> dataset)
    STORE/reduce/             reduce's directory (`<file>.h5.reduce/` for HDF5); its files are
                              reduce's business (`coala_stream.reduce.result`)

Read with `open_store(path)`; capture writes with `create_store` / `open_store(path, "r+")`,
`create_input`, `write_chunk`, `commit`, `rollback`. Only committed rows are ever read.
"""

from .base import Store
from .format import FORMAT, FORMAT_VERSION, LOGICAL_DTYPES, InputInfo, crc32, from_stored, to_stored
from .open import BACKENDS, create_store, detect_backend, open_store, remove_store

__all__ = [
    "BACKENDS",
    "FORMAT",
    "FORMAT_VERSION",
    "LOGICAL_DTYPES",
    "InputInfo",
    "crc32",
    "Store",
    "create_store",
    "detect_backend",
    "from_stored",
    "open_store",
    "remove_store",
    "to_stored",
]

"""Opening a GGUF file: one reader per file in a process, parsed faster than gguf's own.

`gguf.GGUFReader` parses each element of a metadata array as its own field, with two
`np.memmap` slices per element, and a memmap slice runs Python code: opening SmolLM2's
GGUF (49k tokens and merges) took 3 s, Command R's vocabulary (256k) 19 s, and the
tokenizer and the weights each opened the file. `open_gguf` returns the same reader for
both, and its reader builds the very same fields (the same parts, indices and types, so
`ReaderField.contents()` and every other use read them alike) from plain-ndarray views
of the mapped file. Nested arrays go through gguf's own parser.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np


def open_gguf(path: str | Path) -> Any:
    """A `gguf.GGUFReader` of `path`, shared while the file is unchanged (same size and
    modification time). Raises what the reader raises on a bad file; callers name it."""
    path = Path(path).resolve()
    st = path.stat()
    return _open(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _open(path: str, mtime_ns: int, size: int) -> Any:
    del mtime_ns, size  # the cache key
    return _reader_class()(path)


@functools.cache
def _reader_class() -> type:
    import gguf

    array, string = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING

    class Reader(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int):
            if raw_type != array:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype, n = gguf.GGUFValueType(raw_itype[0]), int(alen[0])
            offs = orig_offs + 12
            plain = self.data.view(np.ndarray)
            parts: list[np.ndarray] = [raw_itype, alen]
            types = [array] if n == 0 else [array, itype]
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None:  # one 1-element part per element, as gguf builds them
                dt = np.dtype(nptype).newbyteorder(self.byte_order)
                values = plain[offs:offs + n * dt.itemsize].view(dt)
                parts += [values[i:i + 1] for i in range(n)]
                return 12 + n * dt.itemsize, parts, list(range(2, n + 2)), types
            if itype == string:  # (length, bytes) parts per element; data: the bytes
                u64 = np.dtype(np.uint64).newbyteorder(self.byte_order)
                for _ in range(n):
                    slen = plain[offs:offs + 8].view(u64)
                    end = offs + 8 + int(slen[0])
                    parts += [slen, plain[offs + 8:end]]
                    offs = end
                return offs - orig_offs, parts, list(range(3, 2 * n + 3, 2)), types
            return super()._get_field_parts(orig_offs, raw_type)

    return Reader

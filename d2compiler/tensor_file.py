"""A safetensors file written piece by piece, never holding a whole tensor.

Each tensor is declared (dtype, shape) before its data is written; its bytes go at the next free
offset of the data region, and the data of a tensor, or of one entry of its first dimension (one
expert of a bank), can then be written in any order. The header (every tensor's dtype, shape and byte
range) is written last, into space reserved at the start of the file and padded with spaces, as the
format allows, so that tensors can still be declared after others were written (e.g. buffers a pass
added). `close()` refuses a file with a byte range left unwritten. The result is an ordinary
safetensors file (`safe_open` reads it; `get_slice` reads one expert back)."""

from __future__ import annotations

import json
import os
import struct
from math import prod
from pathlib import Path

import torch

from d2compiler.errors import OutputError

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
          torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
HEADER_BYTES = 1 << 20  # reserved for the header: room for thousands of tensor names


class TensorFileWriter:
    """Writes a safetensors file at `path` (see the module docstring)."""

    def __init__(self, path: Path, header_bytes: int | None = HEADER_BYTES, metadata: dict[str, str] | None = None):
        """`header_bytes`: the space reserved for the header; None sizes it exactly at the first write
        (then every tensor must be declared before any is written)."""
        self.path, self.header_bytes, self.metadata = path, header_bytes, metadata or {"format": "pt"}
        self.exact, self.end = header_bytes is None, 0
        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}  # name -> (dtype, shape, offset)
        self.written: dict[str, set[int]] = {}
        try:
            self.file = open(path, "wb")  # noqa: SIM115 (closed by close())
        except OSError as exc:
            raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from None

    @property
    def data_start(self) -> int:
        if self.header_bytes is None:  # sized now: nothing may be declared after this
            self.header_bytes = len(self._header()) + (-len(self._header()) % 8)
        return 8 + self.header_bytes

    def _header(self) -> bytes:
        header: dict[str, object] = {"__metadata__": self.metadata}
        for name, (dtype, shape, offset) in self.specs.items():
            size = prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        return json.dumps(header, separators=(",", ":")).encode()

    def declare(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Reserve the bytes of tensor `name` (once)."""
        if name in self.specs or (self.exact and any(self.written.values())):
            raise OutputError(f"{self.path}: {name} declared twice, or after the header was sized")
        if dtype not in DTYPES:
            raise OutputError(f"{self.path}: cannot store {name} of dtype {dtype} in safetensors")
        self.specs[name] = (dtype, tuple(shape), self.end)
        self.written[name] = set()
        self.end += prod(shape) * torch.empty((), dtype=dtype).element_size()

    def _put(self, name: str, offset: int, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
        dtype = self.specs[name][0]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise OutputError(f"{self.path}: {name} is {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {tuple(shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            os.pwrite(self.file.fileno(), memoryview(data).cast("B"), self.data_start + offset)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write {name}: {exc.strerror or exc}") from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The whole tensor `name`."""
        _dtype, shape, offset = self.specs[name]
        self._put(name, offset, tensor, shape)
        self.written[name].add(-1)

    def write_entry(self, name: str, index: int, tensor: torch.Tensor) -> None:
        """Entry `index` of the first dimension of tensor `name` (e.g. one expert of a bank)."""
        dtype, shape, offset = self.specs[name]
        self._put(name, offset + index * prod(shape[1:]) * torch.empty((), dtype=dtype).element_size(), tensor, shape[1:])
        self.written[name].add(index)

    def abandon(self) -> None:
        """Close and delete the unfinished file (a run that failed half-way leaves nothing of it)."""
        self.file.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Write the header, flush and close; an error naming the first tensor not written in full."""
        try:
            for name, done in self.written.items():
                shape = self.specs[name][1]
                if -1 not in done and prod(shape) and done != set(range(shape[0])):
                    raise OutputError(f"{self.path}: {name} was not written in full ({len(done)} of {shape[0]} entries)")
            start, text = self.data_start, self._header()
            if len(text) > self.header_bytes:
                raise OutputError(f"{self.path}: the header ({len(text)} bytes) does not fit the {self.header_bytes} reserved")
            self.file.truncate(start + self.end)
            os.pwrite(self.file.fileno(), struct.pack("<Q", self.header_bytes) + text.ljust(self.header_bytes, b" "), 0)
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write: {exc.strerror or exc}") from None
        finally:
            self.file.close()

"""Streaming: never the whole model in memory.

The model is built without weights (parameters on the meta device, buffers real, as
`accelerate.init_empty_weights` does). Embeddings, norms and the head are read once from the
memory-mapped safetensors files; each block's parameters are read when its turn comes and released
(back to the meta device) once it is done. Used by `d2c run` when `model.streaming = true`; the pruned
blocks go to shard files and the output folder is assembled from them (`export.sharded`).

A block's tensors come from `WeightSource` (the source folder: dense) or `file_reader` (a run's block
file: pruned); `placement.Placement` loads and releases them, for pruning and for evaluation
(`runner.ModelRunner`) alike.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.overrides import TorchFunctionMode

from d2compiler.errors import D2Error, ModelLoadError
from d2compiler.execution.expert_groups import fitting_group
from d2compiler.graph.checkpoint_layout import assemble, assemble_expert, learn_layout, pieces_of
from d2compiler.graph.expert_store import ExpertStore, attach_store, store_of
from d2compiler.graph.experts import banks_of
from d2compiler.weight_index import tensor_files


class WeightSource:
    """The tensors of a safetensors model folder (one `model.safetensors`, or shards with an index),
    read one at a time from the memory-mapped files."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = tensor_files(folder)
        if not self.files:
            raise ModelLoadError(f"{folder}: streaming needs safetensors weights (model.safetensors or an index)")

    def keys(self) -> set[str]:
        return set(self.files)

    def read(self, key: str) -> torch.Tensor:
        return _read(self.files[key], key)

    def read_part(self, key: str, lead: slice | None = None) -> torch.Tensor:
        """Tensor `key`, or only its leading-dimension range `lead` (the rest of the file is not read)."""
        if lead is None:
            return self.read(key)
        with safe_open(str(self.files[key]), "pt") as f:
            return f.get_slice(key)[lead.start : lead.stop]

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self.files[key]), "pt") as f:
            return tuple(f.get_slice(key).get_shape())


def as_stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` as the output stores it: a floating tensor cast to `dtype` when one is given (the
    checkpoint's dtype of a run computed in another), anything else as it is."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def round_to_storage(module: nn.Module, dtype: torch.dtype) -> None:
    """Round `module`'s floating parameters and buffers, in place and in their own (compute) dtype,
    to the values `dtype` can store: a block computed in float32 and stored in bfloat16 propagates,
    resumes and evaluates with exactly the weights that are written."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point() and tensor.dtype != dtype and not tensor.is_meta:
                tensor.copy_(tensor.to(dtype))


LARGE = 1 << 26  # entries: a tensor made while a weightless model is built this large is made on the meta device


class _LargeOnMeta(TorchFunctionMode):
    """While a weightless model is built: tensor factories asked for LARGE entries or more, with no
    device named, make meta tensors. `init_empty_weights` moves each parameter to the meta device only
    once it is registered, so a module that builds `nn.Parameter(torch.empty(E, 2I, H))` would first
    ask for the whole bank (30 GB for a DeepSeek-V3 layer in float32, refused by the allocator);
    buffers, small and computed at construction (rotary frequencies), stay real."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None:
            size = args[0] if args and isinstance(args[0], (tuple, list, torch.Size)) else kwargs.get("size", args)
            if size and all(isinstance(n, int) for n in size) and math.prod(size) >= LARGE:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn}


def empty_model(folder: Path, dtype: torch.dtype, attn_implementation: str | None = None) -> nn.Module:
    """The model of `folder` with every parameter on the meta device (no memory), in eval mode."""
    from accelerate import init_empty_weights

    from d2compiler.graph.model_class import model_class, model_load_errors, read_config

    config = read_config(str(folder), str(folder))
    if attn_implementation:
        config._attn_implementation = attn_implementation
    cls = model_class(config, str(folder))
    with init_empty_weights(), _LargeOnMeta(), model_load_errors(str(folder)):
        model = cls._from_config(config, dtype=dtype)
    model.tie_weights()  # tied parameters share one meta tensor, as they will share the loaded one
    return model.eval()


def _tied(model: nn.Module) -> dict[str, str]:
    """Parameter names that share storage with an earlier one (tied embeddings): name -> first name."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            out[name] = first[id(param)]
        else:
            first[id(param)] = name
    return out


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 8 << 20


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def trim_heap() -> None:
    """`malloc_trim(0)` where glibc provides it: freed memory goes back to the OS."""
    if _libc():
        _LIBC.malloc_trim(0)


def map_large_allocations() -> None:
    """Make glibc serve every allocation of 8 MiB or more with its own mapping, returned to the OS when
    freed. Its default threshold grows up to 32 MiB as large blocks are freed, after which weight-sized
    tensors come from the heap and fragment it, so that a streaming run's peak creeps up block by block."""
    if _libc():
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


_LIBC: Any = None


def _release(root: nn.Module, chosen: Callable[[nn.Parameter], bool]) -> None:
    """Replace the `chosen` loaded parameters under `root` by meta tensors of the same shape (their
    memory is freed) and return the freed heap to the OS."""
    for module in root.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and not param.is_meta and chosen(param):
                module._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
    trim_heap()


class StreamedModel:
    """A weightless model whose parts are loaded from `source` when needed (see the module docstring)."""

    def __init__(self, model: nn.Module, source: WeightSource, dtype: torch.dtype):
        from d2compiler.graph.blocks import find_blocks

        self.model, self.source, self.dtype = model, source, dtype
        map_large_allocations()
        self.blocks_path, self.blocks = find_blocks(model)
        self.tied = _tied(model)
        self.outside_loaded = False
        self.converted: dict[str, tuple[int, ...]] = {}  # model tensors the checkpoint holds in its own layout: shape
        self.experts_by_group = False  # experts.load = "group": banks stay in the files, read one group at a time
        self.expert_group_size: int | None = None  # experts read at once in a forward (None: as many as fit)
        self._expert_pieces: dict[str, list[Any]] = {}  # banks read expert by expert: their pieces
        self.check_keys()

    def check_keys(self) -> None:
        """Every parameter and persistent buffer of the model is in the files, with its shape (under
        its own name, or in the checkpoint's own layout that transformers converts as it loads,
        `checkpoint_layout`), and nothing else is (transformers' load report, as an error)."""
        wanted = {name: tuple(t.shape) for name, t in self.model.state_dict().items() if name not in self.tied}
        have = self.source.keys()
        converted: set[str] = set()
        for name in sorted(set(wanted) - have):  # one at a time: a bank's row numbers can be large
            for pieces in learn_layout(self.model, {name: wanted[name]}).values():
                for piece in pieces:
                    if piece.key in have and self.source.shape(piece.key) != piece.shape():
                        raise ModelLoadError(f"{self.source.folder}: tensor {piece.key} has the wrong shape (checkpoint "
                                             f"{self.source.shape(piece.key)}, the model's {name} needs {piece.shape()})")
                    converted.add(piece.key)
                self.converted[name] = wanted[name]
        missing = sorted(set(wanted) - have - set(self.converted)) + sorted(converted - have)
        unexpected = sorted(have - set(wanted) - set(self.tied) - converted)
        for kind, keys in (("missing from the checkpoint", missing), ("in the checkpoint but not in the model", unexpected)):
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                raise ModelLoadError(f"{self.source.folder}: {len(keys)} weights {kind} (does config.json match the "
                                     f"weights?): {', '.join(keys[:3])}{more}")
        for name, shape in wanted.items():
            stored = self.source.shape(name) if name in have else shape
            if stored != shape:
                raise ModelLoadError(f"{self.source.folder}: tensor {name} has the wrong shape (checkpoint {stored}, model {shape})")

    def read_source(self, name: str) -> torch.Tensor:
        """The model's tensor `name` from the source files: stored under its name, or assembled from
        the checkpoint tensors that hold it in the checkpoint's own layout."""
        if name not in self.converted:
            return self.source.read(name)
        shape = self.converted[name]
        pieces = learn_layout(self.model, {name: shape})[name]
        return assemble(name, shape, pieces, self.source.read)

    def read_source_expert(self, name: str, expert: int) -> torch.Tensor:
        """Expert `expert` ([out, in] as stored) of the model's bank `name` from the source files,
        stored under its name or in the checkpoint's own layout; the bank is never read whole."""
        pieces = self.checkpoint_pieces(name)
        if pieces is None:
            return self.source.read_part(name, slice(expert, expert + 1))[0]
        return assemble_expert(name, self.converted[name], pieces, expert, self.source.read_part)

    def checkpoint_pieces(self, name: str) -> list[Any] | None:
        """The checkpoint pieces of the model tensor `name` when the checkpoint stores it in its own
        layout (`learn_layout`), else None."""
        if name not in self.converted:
            return None
        if name not in self._expert_pieces:
            if len(self._expert_pieces) >= 8:  # the banks of the blocks before are done with
                self._expert_pieces.pop(next(iter(self._expert_pieces)))
            self._expert_pieces[name] = learn_layout(self.model, {name: self.converted[name]})[name]
        return self._expert_pieces[name]

    def in_checkpoint_layout(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` (by model name) as the source checkpoint stores them: those it holds in its own
        layout split into its tensors, the others as they are."""
        out = {}
        for name, tensor in tensors.items():
            if name in self.converted:
                out.update(pieces_of(tensor, learn_layout(self.model, {name: self.converted[name]})[name]))
            else:
                out[name] = tensor
        return out

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}."

    def _set(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        """Put `value` (floating tensors cast to the working dtype) on the CPU as `module`'s `name`."""
        from accelerate.utils import set_module_tensor_to_device

        set_module_tensor_to_device(module, name, "cpu", value=value.to(self.dtype) if value.is_floating_point() else value)

    def ensure_outside(self) -> None:
        """Load the parameters outside the blocks if `release_outside` gave them back."""
        if not self.outside_loaded:
            self.load_outside_blocks()

    def release_outside(self) -> None:
        """Give back the parameters outside the blocks (embeddings, head): pruning needs them only to
        capture the first block's inputs; evaluation and the output read them again."""
        inside = {id(p) for p in self.blocks.parameters()}
        _release(self.model, lambda param: id(param) not in inside)
        if self.tied:
            self.model.tie_weights()
        self.outside_loaded = False

    def load_outside_blocks(self) -> None:
        """Read every parameter and persistent buffer that is not inside the blocks, and tie what the
        model ties."""
        for name in self.model.state_dict():
            if name not in self.tied and not name.startswith(self.blocks_path + "."):
                self._set(self.model, name, self.read_source(name))
        if self.tied:
            self.model.tie_weights()
        self.outside_loaded = True

    def load_block(self, index: int, read: Callable[[str], torch.Tensor] | None = None,
                   device: torch.device | None = None) -> nn.Module:
        """Materialise block `index` on the CPU from `read` (default: the source files). With
        `experts_by_group`, its expert banks (3-D parameters) stay on the meta device and each owner of
        banks gets an `ExpertStore` that reads one expert at a time (`read.expert`, or the source's
        `read_source_expert`) onto `device` (default: the CPU)."""
        block, prefix = self.blocks[index], self.block_prefix(index)
        owners = banks_of(block) if self.experts_by_group else {}
        banks = {f"{owner}.{attr}" if owner else attr for owner, entries in owners.items() for attr, _m in entries}
        for name in block.state_dict():  # parameters and persistent buffers
            if name not in banks:
                self._set(block, name, (read or self.read_source)(prefix + name))
        expert = getattr(read, "expert", None) if read is not None else self.read_source_expert
        if owners and expert is None:
            raise D2Error(f"{prefix}: this reader cannot read one expert at a time (experts.load = \"group\")")
        for owner_name, entries in owners.items():
            owner_prefix = f"{prefix}{owner_name}." if owner_name else prefix
            per_expert = sum(getattr(m, attr)[0].numel() for attr, m in entries) * self.dtype.itemsize
            size = self.expert_group_size or fitting_group(per_expert, device or torch.device("cpu"))
            store = ExpertStore([attr for attr, _m in entries], lambda attr, e, p=owner_prefix: expert(p + attr, e),
                                self.dtype, device or torch.device("cpu"), group_size=size)
            attach_store(entries[0][1], store)
        return block

    def release_block(self, index: int) -> None:
        """Give block `index`'s parameters back (they return to the meta device) and hand the freed
        heap back to the operating system, so that the peak follows one block."""
        for module in self.blocks[index].modules():
            if store_of(module) is not None:
                attach_store(module, None)
        _release(self.blocks[index], lambda _param: True)

    def outside_state(self, storage: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors outside the blocks, by full name (tied copies left out, as transformers saves),
        floating ones cast to `storage` when given (`as_stored`)."""
        self.ensure_outside()
        return {name: as_stored(tensor, storage) for name, tensor in self.model.state_dict().items()
                if not name.startswith(self.blocks_path + ".") and name not in self.tied}

    def weights_sha256(self, readers: list[Callable[[str], torch.Tensor]], storage: torch.dtype | None = None) -> str:
        """`export.metadata.weights_sha256` of the whole model, block tensors read through `readers`
        (the same value an in-memory run computes over its state dict); the tensors outside the
        blocks cast to `storage`, as they are written, when it is given."""
        from d2compiler.export.metadata import Entries, tensors_sha256

        self.ensure_outside()
        outside = self.model.state_dict()

        def tensor(name: str) -> torch.Tensor | Entries:
            name = self.tied.get(name, name)
            if name.startswith(self.blocks_path + "."):
                index = int(name[len(self.blocks_path) + 1 :].split(".")[0])
                expert, shape = getattr(readers[index], "expert", None), tuple(outside[name].shape)
                if self.experts_by_group and expert is not None and len(shape) == 3:  # a bank, one expert at a time
                    return Entries(shape, (expert(name, e) for e in range(shape[0])))
                return readers[index](name)
            return as_stored(outside[name], storage)

        return tensors_sha256((name, tensor(name)) for name in sorted(outside))

    @contextmanager
    def block(self, index: int, read: Callable[[str], torch.Tensor] | None = None) -> Iterator[nn.Module]:
        try:
            yield self.load_block(index, read)
        finally:
            self.release_block(index)


def _read(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, copied out of the memory-mapped file."""
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(key)


class FileReader:
    """Reads tensors by full name from one safetensors file (a block file of the run); `expert` reads
    one entry of a bank's first dimension only."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, key: str) -> torch.Tensor:
        return _read(self.path, key)

    def expert(self, key: str, expert: int) -> torch.Tensor:
        with safe_open(str(self.path), "pt") as f:
            return f.get_slice(key)[expert : expert + 1][0]


def file_reader(path: Path) -> FileReader:
    """Read tensors by full name from one safetensors file (a block file of the run)."""
    return FileReader(path)

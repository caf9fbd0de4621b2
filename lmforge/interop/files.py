"""File handling every family's Hugging Face interop shares: reading config.json and weights, the
streaming safetensors writer, and the output directory of a conversion.

    read_hf_config(folder)            config.json as a dict, with one clear error for each way it fails
    WeightSource(folder)              tensors of model.safetensors / its shards / a legacy .bin, read lazily
    write_safetensors_streaming(...)  a safetensors file written one tensor at a time (peak: one tensor)
    check_out(out, overwrite, src)    refuse an --out that is a file, the source itself, or a non-empty folder
    with TempDir(out) as tmp: ...     write into a temp folder beside `out`, renamed into place on success

Only safetensors are read, except a legacy `pytorch_model.bin`, which is read with
`torch.load(weights_only=True)` (no arbitrary unpickling) and a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from lmforge.checkpoint import MODEL_CONFIG, TOKENIZER, atomic_write_text, fsync_dir, replace_dir_atomically
from lmforge.errors import LMForgeError
from lmforge.tokenizer import ROLES, Tokenizer, read_json_object, read_tokenizer_json, token_name

HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
SENTENCE_TRANSFORMERS_MODULES = "modules.json"
# Kept in an lmforge model directory made by an import, so the export goes back to the same
# architecture and token ids: the source's config.json under this name.
HF_CONFIG_SIDECAR = "hf_config.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 2**30  # bytes per output shard, as transformers' save_pretrained


def read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMForgeError(f"{path} is not readable JSON ({e})") from None


def read_hf_config(hf_dir: Path) -> dict:
    """The folder's config.json; errors name a missing folder, a missing file (and an lmforge model
    directory given by mistake), unreadable JSON or a non-object."""
    if not hf_dir.is_dir():
        raise LMForgeError(f"Hugging Face model folder not found: {hf_dir}")
    path = hf_dir / HF_CONFIG
    if not path.is_file():
        if (hf_dir / MODEL_CONFIG).is_file():
            raise LMForgeError(f"{hf_dir} is an lmforge model directory, not a Hugging Face folder; "
                               "export it with `lmforge convert --to-hf`")
        raise LMForgeError(f"{hf_dir} has no {HF_CONFIG}; a Hugging Face model folder needs one")
    cfg = read_json_file(path)
    if not isinstance(cfg, dict):
        raise LMForgeError(f"{path} must hold a JSON object")
    return cfg


def first_id(value: Any) -> Optional[int]:
    """Token id from a config value that may be a list (Llama 3 lists several EOS ids)."""
    if isinstance(value, list):
        return value[0] if value else None
    return value if isinstance(value, int) else None


def write_model_config(directory: Path, family: str, cfg: Any) -> None:
    """model_config.json of an lmforge model directory: {"family", "config"}."""
    from dataclasses import asdict

    atomic_write_text(directory / MODEL_CONFIG, json.dumps({"family": family, "config": asdict(cfg)}, indent=2))


# ---- tokenizers --------------------------------------------------------------------------------

def special_token_names(hf_dir: Path, hf_cfg: dict, vocab: Any = None) -> dict[str, Optional[str]]:
    """Special-token names by role (bos, eos, pad, cls, sep, mask, unk): tokenizer_config.json, then
    special_tokens_map.json (which wins, as in transformers), then for bos / eos / pad the ids in
    config.json / generation_config.json looked up in `vocab` (a tokenizers.Tokenizer)."""
    names: dict[str, Optional[str]] = {r: None for r in ROLES}
    for fname in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        data = read_json_object(hf_dir / fname)
        for k in names:
            names[k] = token_name(data.get(f"{k}_token")) or names[k]
    gen = read_json_object(hf_dir / GENERATION_CONFIG)
    for k in ("bos", "eos", "pad"):
        if names[k] is None and vocab is not None:
            tid = first_id(hf_cfg.get(f"{k}_token_id"))
            tid = tid if tid is not None else first_id(gen.get(f"{k}_token_id"))
            if tid is not None:
                names[k] = vocab.id_to_token(tid)
    return names


def load_hf_tokenizer(hf_dir: Path, hf_cfg: dict, *, encoder: bool = False,
                      max_length: Optional[int] = None) -> Optional[Tokenizer]:
    """The lmforge Tokenizer of a Hugging Face folder's tokenizer.json, its special tokens named as
    transformers names them, with the chat template and generation_config's stop ids; None when the
    folder has no tokenizer.json."""
    path = hf_dir / TOKENIZER
    if not path.is_file():
        if (hf_dir / "tokenizer.model").is_file() or (hf_dir / "vocab.json").is_file():
            warnings.warn(f"{hf_dir} has no tokenizer.json (only slow-tokenizer files); loading without a tokenizer",
                          UserWarning, stacklevel=2)
        return None
    raw = read_tokenizer_json(path)
    names = special_token_names(hf_dir, hf_cfg, raw)
    tok = Tokenizer.with_roles(raw, names, max_length, encoder)
    tok.attach_chat_settings(hf_dir)  # chat template, generation_config's eos ids
    tok.bos_token = names["bos"] or tok.bos_token
    return tok


# ---- reading weights -------------------------------------------------------------------------

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _ST_DTYPES["F8_E4M3" if "e4m3" in _name else "F8_E5M2"] = getattr(torch, _name)
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class WeightSource:
    """Tensors of a checkpoint folder, read lazily one at a time.

    safetensors: `model.safetensors`, or the shards named by `model.safetensors.index.json`
    (opened with safe_open, which memory-maps and checks each file's header and length).
    Legacy `pytorch_model.bin` (or its index) only via torch.load(weights_only=True), with a warning.
    """

    def __init__(self, folder: Path, single: str = SAFE_WEIGHTS, index: str = SAFE_INDEX, allow_bin: bool = True):
        from safetensors import SafetensorError, safe_open

        self.files: dict[str, Path] = {}  # tensor name -> file
        self._handles: dict[Path, Any] = {}
        self._bin: dict[str, torch.Tensor] = {}
        if (folder / single).is_file():
            shard_files = [folder / single]
        elif (folder / index).is_file():
            shard_files = self._shards_from_index(folder / index)
        elif allow_bin and ((folder / BIN_WEIGHTS).is_file() or (folder / BIN_INDEX).is_file()):
            self._load_bin(folder)
            return
        else:
            raise LMForgeError(f"{folder} holds no weights ({single}"
                               f"{', ' + index if index else ''}{', ' + BIN_WEIGHTS if allow_bin else ''} not found)")
        for path in shard_files:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise LMForgeError(f"weights file {path} is truncated or corrupt ({str(e).splitlines()[0]})") from None
            self._handles[path] = handle
            for name in handle.keys():
                self.files[name] = path

    @staticmethod
    def _shards_from_index(index_path: Path) -> list[Path]:
        index = read_json_file(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise LMForgeError(f"{index_path} has no 'weight_map'")
        shards = []
        for name in dict.fromkeys(weight_map.values()):
            path = index_path.parent / str(name)
            if not path.is_file():
                raise LMForgeError(f"{index_path} names the shard {name}, which is missing")
            shards.append(path)
        return shards

    def _load_bin(self, folder: Path) -> None:
        if (folder / BIN_WEIGHTS).is_file():
            paths = [folder / BIN_WEIGHTS]
        else:
            paths = self._shards_from_index(folder / BIN_INDEX)
        warnings.warn(f"{folder}: reading legacy PyTorch weights ({paths[0].name}) with torch.load(weights_only=True); "
                      "prefer safetensors (`lmforge convert --from-hf` writes them)", UserWarning, stacklevel=3)
        for path in paths:
            try:
                try:
                    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # pre-zipfile format cannot be memory-mapped
                    state = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any failure of the restricted unpickler is a bad file
                raise LMForgeError(f"{path} cannot be loaded as plain weights ({str(e).splitlines()[0]})") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise LMForgeError(f"{path} does not hold a dict of tensors")
            for name, t in state.items():
                self._bin[name] = t
                self.files[name] = path

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._bin:
            return tuple(self._bin[name].shape)
        return tuple(self._handles[self.files[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        if name in self._bin:
            return self._bin[name].dtype
        code = self._handles[self.files[name]].get_slice(name).get_dtype()
        if code not in _ST_DTYPES:
            raise LMForgeError(f"{self.files[name]}: tensor '{name}' has the unsupported dtype {code}")
        return _ST_DTYPES[code]

    def get(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The tensor (or rows a:b of it), as a fresh CPU tensor."""
        from safetensors import SafetensorError

        if name in self._bin:
            t = self._bin[name]
            return (t[rows[0]:rows[1]] if rows else t).clone()
        handle = self._handles[self.files[name]]
        try:
            return handle.get_slice(name)[rows[0]:rows[1]] if rows else handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise LMForgeError(f"cannot read tensor '{name}' from {self.files[name]} "
                               f"({str(e).splitlines()[0]})") from None


# ---- the streaming safetensors writer ---------------------------------------------------------

@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: Callable[[], Iterator[torch.Tensor]]  # pieces whose bytes, back to back, are the tensor

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors_streaming(path: Path, tensors: list[OutTensor],
                                metadata: Optional[dict[str, str]] = None) -> None:
    """A safetensors file written tensor by tensor: the header comes from shapes, the data from `chunks()`.

    Peak memory is one tensor's pieces, not the whole file (safetensors' save_file needs every tensor
    in memory at once). The result is byte-compatible with safetensors' own reader.
    """
    header: dict[str, Any] = {}
    offset = 0
    for t in tensors:
        if t.dtype not in _ST_NAMES:
            raise LMForgeError(f"tensor '{t.name}' has the dtype {t.dtype}, which safetensors cannot store")
        header[t.name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for t in tensors:
            written = 0
            for piece in t.chunks():
                piece = piece.to(t.dtype).contiguous()
                data = piece.reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
                del piece, data
            if written != t.nbytes:
                raise AssertionError(f"tensor '{t.name}': wrote {written} bytes, header says {t.nbytes}")
        f.flush()
        os.fsync(f.fileno())


def tensors_in_memory(state: dict[str, torch.Tensor]) -> list[OutTensor]:
    """OutTensors of tensors already in memory (families small enough to convert in memory)."""
    return [OutTensor(name, tuple(t.shape), t.dtype, lambda t=t: iter([t])) for name, t in state.items()]


def shard(plan: list[OutTensor], max_shard_size: int) -> list[list[OutTensor]]:
    """Greedy in order; a tensor larger than the limit gets a shard of its own (as transformers does)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_hf_weights(directory: Path, plan: list[OutTensor], max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards of at most `max_shard_size` bytes
    plus model.safetensors.index.json, as transformers' save_pretrained writes them."""
    shards = shard(plan, max_shard_size)
    if len(shards) == 1:
        write_safetensors_streaming(directory / SAFE_WEIGHTS, shards[0], metadata={"format": "pt"})
        return
    weight_map = {}
    for i, part in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streaming(directory / fname, part, metadata={"format": "pt"})
        weight_map.update({t.name: fname for t in part})
    index = {"metadata": {"total_size": sum(t.nbytes for t in plan)}, "weight_map": weight_map}
    atomic_write_text(directory / SAFE_INDEX, json.dumps(index, indent=2))


# ---- output directory of a conversion -------------------------------------------------------------

def check_out(out: Path, overwrite: bool, src: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"--out {out} is a file, not a directory")
    s, o = src.resolve(), out.resolve()
    if s == o or o in s.parents:
        raise LMForgeError(f"--out {out} would replace the source {src}; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LMForgeError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


class TempDir:
    """A directory beside `out` that becomes `out` on success and vanishes on failure."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        fsync_dir(self.path)
        replace_dir_atomically(self.path, self.out)


# ---- where lmforge tensors lie in a Hugging Face state dict (for adapters) --------------------------

def stacked_parts(mapping: Any, rows: dict[str, int]) -> dict[str, tuple[list[tuple[str, int, int]], bool]]:
    """{lmforge tensor: ([(HF name, first row, end row)], False)} from (lmforge name, [HF names]) pairs whose
    HF tensors are equal pieces stacked along dim 0 (`rows`: each lmforge tensor's first dimension)."""
    out = {}
    for lm, hf_names in mapping:
        if lm not in rows:
            continue
        n = rows[lm] // len(hf_names)
        out[lm] = ([(h, i * n, (i + 1) * n) for i, h in enumerate(hf_names)], False)
    return out


def state_from_plan(plan: Any, have: set[str], get: Callable[[str], torch.Tensor], where: str,
                    ignorable: Any, name: Callable[[str], str] = lambda h: h) -> dict[str, torch.Tensor]:
    """lmforge state from a (lmforge name, [HF names stacked along dim 0]) plan over the HF tensors
    `have` (read with `get`); `name` maps a plan's HF name to the file's. A tensor the plan needs and
    the file lacks, or one the file holds that the plan does not use (unless `ignorable` matches it),
    is an error naming up to five of them."""
    wanted = {name(h) for _, hs in plan for h in hs}
    missing = sorted(wanted - have)
    if missing:
        raise LMForgeError(f"the weights in {where} lack tensors that config.json implies: {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''}")
    extra = sorted(n for n in have - wanted if not ignorable.search(n))
    if extra:
        raise LMForgeError(f"the weights in {where} hold tensors this architecture does not use: "
                           f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    state = {}
    for lm, hs in plan:
        parts = [get(name(h)) for h in hs]
        state[lm] = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    return state

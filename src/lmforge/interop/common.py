"""Reading and writing Hugging Face model directories safely (safetensors, weights_only)."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from lmforge.errors import LMForgeError
from lmforge.files import staged_dir

EXPORT_FILES = frozenset(
    {
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
)  # what write_hf_dir writes, besides the shards of a sharded export
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
INDEX = "model.safetensors.index.json"


def exported(name: str) -> bool:
    """Whether a file of this name is one that write_hf_dir writes."""
    return name in EXPORT_FILES or SHARD.fullmatch(name) is not None


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``rows`` (a vocabulary padded to a multiple of 64);
    the padded rows are never read, and exports cut them off again."""
    return torch.cat([t, t.new_zeros(rows - t.size(0), *t.shape[1:])]) if t.size(0) < rows else t


def read_hf_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The ``config.json`` and the state dict of a ``save_pretrained`` directory."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LMForgeError(
            f"{config_file} not found: give a directory written by transformers' save_pretrained"
        )
    config = json.loads(config_file.read_text())
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        try:
            state = load_file(str(path / "model.safetensors"))
        except Exception as e:
            raise LMForgeError(
                f"{path}/model.safetensors cannot be read ({e}): the file is corrupt or truncated"
            ) from None
    elif (path / "pytorch_model.bin").is_file():
        try:
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise LMForgeError(
                f"{path}/pytorch_model.bin cannot be loaded safely ({type(e).__name__}): convert it to safetensors"
            ) from None
    else:
        raise LMForgeError(
            f"{path} holds neither model.safetensors nor pytorch_model.bin (sharded checkpoints are not supported)"
        )
    return config, state


def config_json(path: Path) -> dict:
    """The ``config.json`` of a transformers directory, as a dict."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LMForgeError(
            f"{config_file} not found: give a directory written by transformers' save_pretrained"
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise LMForgeError(f"{config_file} is not valid JSON ({e}): restore the file") from None


class SafetensorsDir:
    """The tensors of a ``save_pretrained`` directory, read one at a time: ``model.safetensors``,
    or the shards that ``model.safetensors.index.json`` lists. Nothing is read until asked for,
    and ``read_into`` copies a tensor into its place in the model through a buffer of
    ``CHUNK`` bytes, so an import holds the model and a few MB beside it. (safetensors'
    ``safe_open`` maps the whole file and ``get_tensor`` returns a full copy: the mapped pages
    and the copy of the largest tensor, twice a 65 MB embedding for a bf16 Llama-3.2-1B, would
    sit in memory beside the model; the format is an 8-byte header length, a JSON header of
    dtype, shape and byte offsets, and the raw little-endian bytes, so plain reads do.)
    Every problem is an LMForgeError naming the file and the fix."""

    CHUNK = 4 << 20

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index, single = self.path / INDEX, self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise LMForgeError(
                    f"{index} is not a shard index (no weight_map: {type(e).__name__}): restore"
                    " it from the model's source"
                ) from None
            self.source = index
            self.files = {name: self.path / file for name, file in weight_map.items()}
            for file in sorted(set(self.files.values())):
                if not file.is_file():
                    raise LMForgeError(
                        f"{file} not found, though {INDEX} lists it: download the missing shard"
                        " (or the whole directory) again"
                    )
        elif single.is_file():
            self.source = single
            self.files = dict.fromkeys(self._keys(single), single)
        else:
            found = "pytorch_model.bin" if (self.path / "pytorch_model.bin").is_file() else None
            fix = (
                "convert pytorch_model.bin to safetensors (transformers: save_pretrained)"
                if found
                else "give a directory written by transformers' save_pretrained"
            )
            raise LMForgeError(f"{self.path} holds neither model.safetensors nor {INDEX}: {fix}")

    @staticmethod
    def _keys(file: Path) -> list[str]:
        return [k for k in SafetensorsDir._header(file)[1] if k != "__metadata__"]

    @staticmethod
    def _header(file: Path) -> tuple[int, dict]:
        """(bytes before the tensor data, the JSON header) of a safetensors file."""
        return _safetensors_header(file, file.stat().st_mtime_ns)

    def names(self) -> set[str]:
        return set(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str, needed_by: str = "config.json") -> tuple[int, ...]:
        return tuple(self._entry(name, needed_by)[2]["shape"])

    def _entry(self, name: str, needed_by: str) -> tuple[Path, int, dict]:
        file = self.files.get(name)
        if file is None:
            raise LMForgeError(
                f"{self.source} has no tensor {name}, which {needed_by} needs: the checkpoint is"
                " incomplete or config.json describes another model; download it again"
            )
        start, header = self._header(file)
        entry = header.get(name)
        if entry is None:
            raise LMForgeError(
                f"{file} has no tensor {name}, though {INDEX} places it there: the shard is"
                " incomplete or from another checkpoint; download it again"
            )
        return file, start, entry

    def read_into(self, name: str, dest: torch.Tensor, needed_by: str = "config.json") -> None:
        """Copy the tensor ``name`` into ``dest`` (a contiguous tensor of its shape), converting
        its dtype to ``dest``'s, ``CHUNK`` bytes at a time."""
        file, start, entry = self._entry(name, needed_by)
        dtype = DTYPES.get(entry.get("dtype"))
        begin, end = entry.get("data_offsets", (0, -1))
        count = dest.numel()
        if dtype is None or end - begin != count * dtype.itemsize:
            raise LMForgeError(
                f"{file}: tensor {name} ({entry.get('dtype')}, {end - begin} bytes) cannot fill"
                f" {count} values: the file is corrupt or of a dtype lmforge does not read;"
                " download it again"
            )
        flat = dest.view(-1)
        buf = torch.empty(max(1, self.CHUNK // dtype.itemsize), dtype=dtype)
        raw = buf.view(torch.uint8).numpy()
        with open(file, "rb") as f:
            f.seek(start + begin)
            done = 0
            while done < count:
                k = min(buf.numel(), count - done)
                if f.readinto(memoryview(raw)[: k * dtype.itemsize]) != k * dtype.itemsize:
                    raise LMForgeError(
                        f"{file} ends inside tensor {name}: the file is truncated; download it"
                        " again"
                    )
                flat[done : done + k].copy_(buf[:k])
                done += k


@functools.lru_cache(maxsize=256)
def _safetensors_header(file: Path, mtime_ns: int) -> tuple[int, dict]:
    """Read once per version of the file (``mtime_ns``), however many tensors are taken from it."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100_000_000:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise LMForgeError(
            f"{file} cannot be read ({type(e).__name__}): the file is corrupt or truncated;"
            " download it again"
        ) from None
    return 8 + n, header


DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}  # safetensors dtype names


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """``state`` cut, in order, into groups of at most ``max_bytes`` (a larger tensor alone)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    return groups


def write_hf_dir(
    out: str | Path,
    config: dict,
    state: dict[str, torch.Tensor],
    tokenizer=None,
    tokenizer_config: dict | None = None,
    extra_files: dict[str, str] | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json, the weights and tokenizer files into ``out`` (built aside, then
    renamed); an existing ``out`` is replaced only when it is an export of lmforge (or empty).

    The weights go into ``model.safetensors``, or, when they exceed ``max_shard_bytes``, into
    shards ``model-0000i-of-0000n.safetensors`` listed by ``model.safetensors.index.json``, as
    transformers writes them. ``extra_files`` (name -> text; names of ``EXPORT_FILES``) are
    written as given, after the tokenizer files (a ``tokenizer_config.json`` among them replaces
    the one made from ``tokenizer_config``)."""
    from safetensors.torch import save_file

    out = Path(out)
    for name in extra_files or {}:
        if name not in EXPORT_FILES:
            raise ValueError(f"write_hf_dir writes no file named {name}")
    with staged_dir(out, exported, "choose another output directory (a new or empty one)") as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        groups = _shards(state, max_shard_bytes) if max_shard_bytes else [state]
        weight_map = {}
        for i, group in enumerate(groups, 1):
            name = (
                "model.safetensors"
                if len(groups) == 1
                else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            )
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in group.items()},
                str(tmp / name),
                metadata={"format": "pt"},
            )
            weight_map |= dict.fromkeys(group, name)
        if len(groups) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or {}, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out

"""Load models saved by lmforge training runs, safely (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmforge.data.chat import TokenizerSettings, read_tokenizer_settings
from lmforge.errors import LMForgeError
from lmforge.files import atomic_torch_save
from lmforge.models.registry import Family, family_for_hf, hf_model_types
from lmforge.models.registry import family as get_family


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint file's bytes: the first record that fails its CRC-32 (a
    ``torch.save`` file is a zip archive whose records carry one each), or an archive that cannot
    be read (a truncated file); None when the whole payload is intact.

    ``torch.load`` checks no CRC, so without this a checkpoint with bytes zeroed or flipped inside
    a tensor loads silently. Reading the file through costs about 0.3 s per 500 MB from the page
    cache (disk speed otherwise); no format change, so older checkpoints are checked too."""
    try:
        with zipfile.ZipFile(path) as archive:
            record = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"not a complete zip archive: {e}"
    return None if record is None else f"record {record} fails its CRC-32 check"


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint of ours as a dict: a single file, or a sharded (FSDP) directory consolidated
    in memory (without optimizer states). The payload is verified against its CRC-32s first."""
    path = Path(path)
    if path.is_dir():
        return read_sharded(path)
    if not path.is_file():
        raise LMForgeError(
            f"checkpoint {path} not found: pass ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    try:
        reason = damage(path)
        if reason is None:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a checkpoint, or pickled objects
        reason = type(e).__name__
    raise LMForgeError(
        f"checkpoint {path} cannot be read ({reason}): it is corrupt or not an lmforge checkpoint"
    )


_METADATA_CLASSES = {  # what the index of a torch.distributed.checkpoint directory may hold
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """The index (``.metadata``) of a distributed checkpoint is a pickle; this reads it with
    nothing but checkpoint-metadata classes and dtypes allowed, as weights_only does for tensors."""

    def find_class(self, module: str, name: str):
        if (
            (module, name) in _METADATA_CLASSES
            or module == "torch.distributed.checkpoint.metadata"
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(path / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(path)


def read_sharded(path: Path) -> dict:
    """A sharded checkpoint directory (Lightning's ModelParallelStrategy / FSDPStrategy) as one
    plain checkpoint: full model weights and the run's metadata; optimizer states left out.

    Only tensors are read from the shards (no pickled objects); ``meta.pt`` is read with
    ``weights_only=True`` after its CRC-32s are verified. The shards (``.distcp``) carry no
    checksums: a missing or truncated one fails, bytes damaged inside one are not detected.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (path / ".metadata").is_file() or not (path / "meta.pt").is_file():
        raise LMForgeError(
            f"{path} is a directory but not a sharded lmforge checkpoint (no .metadata / meta.pt):"
            " pass a checkpoint file or a directory written by trainer=fsdp"
        )
    try:
        reader = _reader(path)
        index = reader.read_metadata()
        weights = {
            fqn.removeprefix("state_dict."): torch.empty(md.size, dtype=md.properties.dtype)
            for fqn, md in index.state_dict_metadata.items()
            if fqn.startswith("state_dict.") and isinstance(md, TensorStorageMetadata)
        }
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"state_dict": weights}, storage_reader=reader, no_dist=True)
        reason = damage(path / "meta.pt")
        if reason is not None:
            raise ValueError(f"meta.pt: {reason}")
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # missing shard, truncated file, foreign classes
        raise LMForgeError(
            f"sharded checkpoint {path} cannot be read ({type(e).__name__}: {e}): it is incomplete"
            " or corrupt"
        ) from None
    return meta | {"state_dict": weights}


def consolidate(path: str | Path, output: str | Path | None = None) -> Path:
    """Write the sharded checkpoint ``path`` as one file (default: ``<name>.consolidated.ckpt``
    beside it) that ``lmforge-generate``, ``lmforge-eval`` and the exports read."""
    path = Path(path)
    if not path.is_dir():
        raise LMForgeError(f"{path} is not a sharded checkpoint directory: nothing to consolidate")
    output = (
        Path(output)
        if output
        else path.with_name(path.name.removesuffix(".ckpt") + ".consolidated.ckpt")
    )
    atomic_torch_save(read_sharded(path), output)
    return output


def checkpoint_step(path: Path, verify: bool = True) -> int | None:
    """The optimizer step a checkpoint (file or sharded directory) was saved at; None when it is
    incomplete, corrupt (``verify``: a record fails its CRC-32) or unreadable. Without
    ``verify`` the tensors are memory-mapped, not read."""
    try:
        if path.is_dir():
            if not (path / ".metadata").is_file():
                return None
            path = path / "meta.pt"  # the shards (.distcp) carry no checksums: only it is verified
        if verify and damage(path) is not None:
            return None
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=path.is_file())
        return int(meta["global_step"])
    except Exception:
        return None


def set_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint to ``<name>.corrupt`` (never deleted: it may still be worth
    something to its owner), so that no later resume or retention step takes it again."""
    aside = path.with_name(path.name + ".corrupt")
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.{n}.corrupt"), n + 1
    path.rename(aside)
    return aside


def find_resume(ckpt_dir: Path, set_aside_corrupt: bool = True) -> tuple[Path, int] | None:
    """The newest intact checkpoint in ``ckpt_dir`` (the highest step; the latest written among
    equals) and its step. Steps are read from each file's metadata; the payload of the one chosen
    is verified (CRC-32s), and every unreadable or corrupt one passed over is warned about and,
    with ``set_aside_corrupt`` (rank 0), renamed to ``<name>.corrupt``."""
    found = []
    for path in (p for p in ckpt_dir.glob("*.ckpt") if not p.name.startswith(".")):
        found.append((checkpoint_step(path, verify=False), path.stat().st_mtime, path))
    found.sort(key=lambda f: (f[0] is None, f[0] or 0, f[1]), reverse=True)  # unreadable first
    for step, _, path in found:
        if step is not None and checkpoint_step(path) is not None:
            return path, step
        note = ""
        if set_aside_corrupt:
            note = f" and renamed to {set_aside(path).name}"
        warnings.warn(
            f"checkpoint {path} is incomplete or corrupt (a crash while writing, or damaged bytes):"
            f" passed over{note}",
            stacklevel=2,
        )
    return None


HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def local_path(source: str | Path) -> Path:
    """``source`` itself when it exists; a hub name (``gpt2``, ``openai-community/gpt2-xl``)
    is downloaded (config, safetensors weights, tokenizer) into the Hugging Face cache."""
    path = Path(source)
    if path.exists() or path.suffix in (".ckpt", ".pt", ".bin") or not HUB_NAME.match(str(source)):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LMForgeError(
            f"{source} is not a file or directory here; to fetch it from the Hugging Face hub,"
            " pip install 'lmforge[hub]'"
        ) from None
    try:
        return Path(
            snapshot_download(
                str(source),
                allow_patterns=[
                    "config.json",
                    "generation_config.json",
                    "*.safetensors",
                    "model.safetensors.index.json",
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "special_tokens_map.json",
                ],
            )
        )
    except Exception as e:
        raise LMForgeError(
            f"{source} is not a file or directory here, and fetching it from the Hugging Face hub"
            f" failed ({type(e).__name__}): offline? download it elsewhere and pass its path"
        ) from None


def hf_tokenizer(path: Path) -> Tokenizer | None:
    """The ``tokenizer.json`` of a transformers directory, if it has one (without the padding,
    truncation and post-processor the file may carry: lmforge adds special tokens itself)."""
    from lmforge.data.tokenizer import load_tokenizer

    tok_file = path / "tokenizer.json"
    return load_tokenizer(tok_file) if tok_file.is_file() else None


@dataclass
class Loaded:
    """A model read from a checkpoint of ours or a transformers directory."""

    model: torch.nn.Module  # in eval mode, on the CPU, adapters merged
    tokenizer: Tokenizer | None  # None when the source carries none
    family: Family
    ours: bool  # a checkpoint of lmforge-train (False: a transformers directory)
    # what the tokenizer's tokenizer_config.json says: special tokens, chat template
    tokenizer_settings: TokenizerSettings | None = None


def checkpoint_kind(hparams: dict) -> str:
    """What a checkpoint of ours holds, as its hyperparameters record it: ``classifier`` (it
    saved its ``labels``), ``reward`` (a reward model), else ``lm`` (a language model)."""
    if "labels" in hparams:
        return "classifier"
    return "reward" if hparams.get("reward") else "lm"


def checkpoint_family(hparams: dict) -> str:
    """The family a checkpoint of ours records. Checkpoints written before families were
    recorded hold none: there a masked-LM task (it saved its ``masking``) meant a BERT, a
    classifier its ``family``, anything else a GPT."""
    if "family" in hparams:
        return hparams["family"]
    return "bert" if "masking" in hparams else "gpt"


def load_model(source: str | Path, causal: bool | None = None, what: str = "") -> Loaded:
    """The language model of a checkpoint of ours (a file or a sharded directory), of a
    transformers directory, or of a hub name, with its tokenizer and family. ``causal``:
    refuse a model that is not (True) or is (False) a causal LM, ``what`` naming the use."""
    path = local_path(source)
    if path.is_dir() and (path / "config.json").is_file():
        from lmforge.interop.common import config_json

        hf = config_json(path)
        try:
            fam = family_for_hf(hf.get("model_type"))
        except ValueError:
            arch = ", ".join(hf.get("architectures") or []) or "no architectures"
            raise LMForgeError(
                f"{path / 'config.json'}: model_type {hf.get('model_type')!r} ({arch}) is not"
                f" supported (lmforge imports {', '.join(hf_model_types())}): convert the model to"
                " one of these, or register a family for it (docs/architecture.md)"
            ) from None
        loaded = Loaded(fam.import_hf(path), hf_tokenizer(path), fam, ours=False)
        loaded.tokenizer_settings = read_tokenizer_settings(path)
    else:
        loaded = _load_ours(path)
    if causal is not None and loaded.family.causal != causal:
        kind = "a causal LM (GPT, Llama, ...)" if causal else "a masked LM (BERT)"
        raise LMForgeError(
            f"{source} holds a {loaded.family.name.upper()}: {what or 'this'} needs {kind}"
        )
    return loaded


def _load_ours(path: Path) -> Loaded:
    ckpt = load_checkpoint(path)
    hparams = ckpt.get("hyper_parameters", {})
    if "model" not in hparams or "state_dict" not in ckpt:
        raise LMForgeError(f"{path} is not a checkpoint of lmforge-train (no model config)")
    kind = checkpoint_kind(hparams)
    if kind == "classifier":
        raise LMForgeError(f"checkpoint {path} is a classifier, not a language model")
    if kind == "reward":
        raise LMForgeError(
            f"checkpoint {path} is a reward model, not a language model: score texts with"
            " lmforge-score, or start a fine-tune from the checkpoint it was trained from"
        )
    try:
        fam = get_family(checkpoint_family(hparams))
        model = fam.build(fam.config(**hparams["model"]))
    except (TypeError, ValueError) as e:
        raise LMForgeError(
            f"checkpoint {path} holds a model config lmforge cannot build ({e})"
        ) from None
    state = {
        k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
    }
    lora = (hparams.get("task") or hparams).get("lora") or {}
    if lora.get("rank"):  # adapters of a fine-tune: folded into the weights
        from lmforge.models.lora import add_lora, merge_lora

        add_lora(model, lora["targets"], lora["rank"], lora["alpha"])
        model.load_state_dict(state)
        merge_lora(model).requires_grad_(True)
    else:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise LMForgeError(
                f"checkpoint {path}: its weights do not fit its {fam.name.upper()} config"
                f" ({str(e).splitlines()[0][:120]})"
            ) from None
    tokenizer = Tokenizer.from_str(ckpt["tokenizer"]) if "tokenizer" in ckpt else None
    carried = ckpt.get("tokenizer_config")
    settings = TokenizerSettings.from_dict(
        carried or {},
        f"{path} (the tokenizer_config.json it carries)"
        if carried
        else f"{path} (no tokenizer_config.json)",
    )
    return Loaded(model.eval(), tokenizer, fam, ours=True, tokenizer_settings=settings)


def is_reward_model(source: str | Path) -> bool:
    """Whether ``source`` is a reward-model checkpoint of lmforge-train (task=reward)."""
    path = Path(source)
    if not (path.is_file() or (path.is_dir() and not (path / "config.json").is_file())):
        return False
    return checkpoint_kind(load_checkpoint(path).get("hyper_parameters", {})) == "reward"


def load_reward_model(source: str | Path, device: str | torch.device = "cpu"):
    """The reward model of a checkpoint of lmforge-train (task=reward), in eval mode on
    ``device``, adapters merged: a ``models.reward.RewardModel`` with its ``tokenizer``,
    ``family`` and ``pad_id``; ``score(prompt_ids, response_ids)`` rewards token ids."""
    from lmforge.models.reward import RewardModel

    path = Path(source)
    ckpt = load_checkpoint(path)
    hparams = ckpt.get("hyper_parameters", {})
    if checkpoint_kind(hparams) != "reward":
        raise LMForgeError(
            f"{path} is not a reward model: train one with lmforge-train experiment=rm_gpt"
            " (task=reward), or pass its checkpoint"
        )
    fam = get_family(checkpoint_family(hparams))
    backbone = fam.build(fam.config(**hparams["model"]))
    backbone.remove_lm_head()
    rm = RewardModel(backbone, hparams["pad_id"], fam.causal)
    state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("model.", "head."))}
    state = {("backbone." + k[6:] if k.startswith("model.") else k): v for k, v in state.items()}
    lora = (hparams.get("task") or {}).get("lora") or {}
    if lora.get("rank"):  # adapters folded into the weights
        from lmforge.models.lora import add_lora, merge_lora

        add_lora(backbone, lora["targets"], lora["rank"], lora["alpha"])
        rm.load_state_dict(state)
        merge_lora(backbone)
    else:
        rm.load_state_dict(state)
    rm.tokenizer = Tokenizer.from_str(ckpt["tokenizer"]) if "tokenizer" in ckpt else None
    rm.family = fam
    rm.tokenizer_settings = TokenizerSettings.from_dict(
        ckpt.get("tokenizer_config") or {}, f"{path} (the tokenizer_config.json it carries)"
    )
    return rm.requires_grad_(False).eval().to(device)

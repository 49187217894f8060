"""Load a causal LM and its tokenizer from local files only, frozen and in eval mode."""

from __future__ import annotations

import json
import logging
import pickle
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.config import ModelConfig, PlacementConfig
from engine.errors import TributaryError
from engine.model.placement import attach_adapter_to_dispatched, device_map_arguments

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Projections and statistics run in float64 for float64 models and float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def refuse_remote_code(path: str, trust_remote_code: bool) -> None:
    """One line, before any model code runs, where model.path's config.json names a model_type this transformers
    does not know (so only code the checkpoint ships could build it) and model.trust_remote_code is false. An
    auto_map beside a known model_type is not refused: transformers then uses its own implementation."""
    if trust_remote_code:
        return
    from transformers import CONFIG_MAPPING, __version__

    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return  # not readable as JSON: the loaders name the problem
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str) or model_type in CONFIG_MAPPING:
        return
    auto_map = raw.get("auto_map")
    needs = f"its model_type {model_type!r} is not a family transformers {__version__} knows"
    if auto_map:
        classes = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
        needs += f", and its config.json auto_map names custom code ({', '.join(str(c) for c in classes)})"
    raise TributaryError(
        f"model.path {path} needs remote code: {needs}; Tributary does not run a checkpoint's own code unless "
        "model.trust_remote_code is true (set it only for code you trust), or give a checkpoint of a family "
        "transformers implements"
    )


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise TributaryError(f"model.path {path}: no tokenizer could be loaded ({error})") from None


def checked_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer of model.path, with a clear error when the path does not exist or needs remote code."""
    if not Path(path).exists():
        raise TributaryError(
            f"model.path {path} does not exist; give a local HF model directory "
            "(models are never downloaded at run time)"
        )
    if not (Path(path) / "config.json").is_file():
        raise TributaryError(f"model.path {path} is not an HF model directory (it has no config.json)")
    refuse_remote_code(path, trust_remote_code)
    return load_tokenizer(path, trust_remote_code)


def model_vocabulary_size(path: str) -> int | None:
    """The vocabulary size in model.path's config.json (its text model's, for a multimodal one); None if unread."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = raw.get("vocab_size", (raw.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def load_model(
    config: ModelConfig, device: torch.device | None = None, placement: PlacementConfig | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer); weights frozen, eval mode, in placement.dtype (else model.dtype).

    The model's own attention implementation is kept (SDPA by default): no vmap is used, and
    transformers' eager attention produces NaN for left-padded float64 batches.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    placement = placement or PlacementConfig()
    dtype = DTYPES[placement.dtype or config.dtype]
    device = device or default_device()
    path = config.path
    if not Path(path).exists():
        raise TributaryError(
            f"model.path {path} does not exist; give a local HF model directory "
            "(models are never downloaded at run time)"
        )
    trust = config.trust_remote_code
    refuse_remote_code(path, trust)
    try:
        model_config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust)
    except (OSError, ValueError) as error:
        raise TributaryError(f"model.path {path} is not an HF model directory: {error}") from None
    dispatched = placement.kind == "device_map"
    if dispatched and config.adapter is not None and config.adapter_mode == "merged":
        raise TributaryError(
            "model.adapter_mode merged cannot fold an adapter into weights accelerate offloads "
            "(placement.kind device_map); use adapter_mode adapter, or save the merged model once "
            "(peft merge_and_unload + save_pretrained) and give it as model.path"
        )
    arguments = device_map_arguments(placement) if dispatched else {}
    try:
        with quiet_offload_notice():
            model = AutoModelForCausalLM.from_pretrained(
                path, config=model_config, dtype=dtype, local_files_only=True, trust_remote_code=trust, **arguments
            )
    except torch.OutOfMemoryError:
        raise  # the machine's limit, not a fault of the files
    except (*UNREADABLE_WEIGHTS, SafetensorError) as error:
        raise _unreadable_weights(path, error) from None
    if config.adapter is not None:
        adapter = config.adapter
        if dispatched:
            adapted = attach_adapter_to_dispatched(model, adapter, lambda base: _attach_adapter(base, adapter, path))
        else:
            adapted = _attach_adapter(model, adapter, path)
        if config.adapter_mode == "adapter":
            model = adapted
        elif config.adapter_mode == "merged":
            model = adapted.merge_and_unload()  # W + scaling·B A folded in: plain modules, tracked as usual
        else:
            model = adapted.unload()  # checked against the base, then removed: the base model alone
    model.requires_grad_(False)
    model.eval()
    if not dispatched:  # accelerate's hooks place a dispatched model's modules
        # PreTrainedModel.to is wrapped with functools.wraps, whose typeshed stub loses the method binding
        model.to(device)  # pyright: ignore[reportArgumentType]
    return model, load_tokenizer(config.tokenizer or path, trust)


def loaded_model_config(config: ModelConfig, placement: PlacementConfig | None = None):
    """The config that `load_model`'s model carries (what its fingerprint hashes), without reading any weights:
    model.path's config as `from_pretrained` reads it, given to the model class built on the meta device (which
    sets the dtype and whatever else the class sets on its config). A peft model's config is its base model's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = config.trust_remote_code
    model_config = AutoConfig.from_pretrained(config.path, local_files_only=True, trust_remote_code=trust)
    dtype = DTYPES[(placement or PlacementConfig()).dtype or config.dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=trust)
    return model.config


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _weight_files(root: Path) -> list[Path]:
    """The weight files transformers would read from `root`: the shards an index names, or the one file."""
    for index_name in SHARD_INDEXES:
        index = root / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                return [root / name for name in sorted(set(weight_map.values()))]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise TributaryError(f"model.path {index} is not a readable shard index ({error})") from None
    return [root / name for name in WEIGHT_FILES if (root / name).exists()]


def check_weight_files(path: str) -> None:
    """Before anything is written or any worker starts: model.path has its weight files, and each
    safetensors file's header parses (a garbage, empty or truncated file fails here, in milliseconds)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_dir():
        raise TributaryError(f"model.path {path} does not exist or is not a directory; give a local HF model directory")
    files = _weight_files(Path(path))
    if not files:
        raise TributaryError(
            f"model.path {path} has no weights (no {' or '.join(WEIGHT_FILES)}); give a complete HF model directory"
        )
    for file in files:
        if not file.is_file():
            what = "a directory, not a file" if file.is_dir() else "missing or not a regular file"
            raise TributaryError(f"model.path {path}: weight file {file} is {what}; give a complete HF model directory")
        if file.suffix != ".safetensors":
            continue  # a pickle is only checked by loading it
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (OSError, SafetensorError) as error:
            raise TributaryError(
                f"model.path {path}: weight file {file} cannot be read ({error}); replace it with a complete copy"
            ) from None


# What safetensors, torch.load and transformers raise for weight files that are missing, truncated or not
# weights at all.
UNREADABLE_WEIGHTS = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError)


def _unreadable_weights(path: str, error: Exception) -> TributaryError:
    reason = _first_lines(str(error), lines=1)[:300]
    return TributaryError(
        f"model.path {path}: its weights cannot be loaded ({type(error).__name__}: {reason}); "
        "check that model.safetensors (or pytorch_model.bin) is a complete weight file"
    )


@contextmanager
def quiet_offload_notice() -> Iterator[None]:
    """transformers and accelerate log "Some parameters are on the meta device because they were offloaded" at
    warning level for every device_map load that offloads: that is the point of offload, not a problem."""
    from transformers.utils import logging as transformers_logging

    loggers = [transformers_logging.get_logger("transformers.modeling_utils"), logging.getLogger("accelerate")]
    loggers.append(logging.getLogger("accelerate.big_modeling"))
    notice = _OffloadNotice()
    for logger in loggers:
        logger.addFilter(notice)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notice)


class _OffloadNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "offloaded to the" not in record.getMessage()


@contextmanager
def quiet_peft_deprecations() -> Iterator[None]:
    """peft asks transformers 5 for a renamed attribute (`is_gradient_checkpointing`) and transformers
    warns on every adapter load; there is nothing for a user to do about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _attach_adapter(model: nn.Module, adapter: str, model_path: str | None = None) -> PeftModel:
    """Wrap `model` in the peft adapter at `adapter`, after checking it was made for this base model.

    The adapter's `adapter_config.json` must exist; its `base_model_name_or_path` is compared with
    `model.path` by `check_adapter_base` (a different base is an error naming both, an undecidable one
    a logged warning), and its `target_modules` must name modules of the model. Anything peft still
    refuses (e.g. a shape mismatch) is re-raised as a TributaryError naming both paths.
    """
    from peft import PeftModel

    if not Path(adapter).is_dir():
        raise TributaryError(f"model.adapter {adapter} is not a directory; give a peft adapter directory")
    adapter_config = _read_adapter_config(adapter)
    if model_path is not None:
        check_adapter_base(adapter, adapter_config.get("base_model_name_or_path"), model_path)
    _check_target_modules(model, adapter, adapter_config, model_path)
    try:
        with quiet_peft_deprecations():
            return PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (ValueError, RuntimeError, KeyError, TypeError) as error:
        raise TributaryError(
            f"model.adapter {adapter} cannot be attached to model.path {model_path}: "
            f"{type(error).__name__}: {_first_lines(str(error))}; use the adapter's own base model"
        ) from None


def _first_lines(text: str, lines: int = 3) -> str:
    return " ".join(text.strip().splitlines()[:lines])


def _read_adapter_config(adapter: str) -> dict:
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise TributaryError(f"model.adapter {adapter} has no adapter_config.json; give a peft adapter directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TributaryError(f"model.adapter {path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise TributaryError(f"model.adapter {path} must hold a JSON object")
    return config


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_CACHE = re.compile(r"models--([^/\\]+?)--([^/\\]+)")


def _hub_id_of_cache_path(path: Path) -> str | None:
    """`org/name` for a directory inside the HF hub cache (`.../models--org--name/snapshots/HASH`)."""
    match = None
    for part in path.parts:
        match = _HUB_CACHE.fullmatch(part) or match
    return f"{match.group(1)}/{match.group(2)}" if match else None


def _model_names(path: Path) -> tuple[set[str], set[str]]:
    """(names, hub ids) a local model directory is known by: its resolved path and basename; hub ids from
    an HF cache path and from `_name_or_path` in its config.json (transformers 4 wrote it on save)."""
    resolved = path.resolve()
    names = {str(resolved), resolved.name.lower()}
    hub_ids = set()
    cached = _hub_id_of_cache_path(resolved)
    if cached:
        hub_ids.add(cached.lower())
    try:
        recorded = json.loads((path / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and recorded.strip():
        recorded = recorded.strip().rstrip("/")
        if _HUB_ID.match(recorded) and not Path(recorded).exists():
            hub_ids.add(recorded.lower())
        names.add(recorded.replace("\\", "/").rsplit("/", 1)[-1].lower())
    names.update(hub_id.rsplit("/", 1)[-1] for hub_id in hub_ids)
    return names, hub_ids


def _architecture(path: Path) -> dict | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    ignored = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "use_cache"}
    return {k: v for k, v in config.items() if k not in ignored} if isinstance(config, dict) else None


def check_adapter_base(adapter: str, base: object, model_path: str) -> None:
    """Refuse an adapter made for another base model; warn and go on when that cannot be decided.

    The rule, with B = the adapter's `base_model_name_or_path` and M = `model.path`:

    * **different** (a TributaryError naming both) when B is a local model directory whose config.json
      describes another architecture than M's (model type, sizes, vocabulary ...: every key but
      `_name_or_path`, `transformers_version`, dtype, `architectures`, `use_cache`), whatever the names;
      or when B is a hub id and M is known by other hub ids only (see below);
    * **same** (go on silently) when B and M resolve to the same directory, or their last path
      components match (case-insensitive: the hub id `HuggingFaceTB/SmolLM2-135M` and a local copy
      `/models/SmolLM2-135M`), or B equals a hub id M is known by: M's `models--org--name` HF cache
      path or the `_name_or_path` recorded in M's config.json;
    * **undecidable** (a logged warning, and the adapter is used) otherwise: B is missing, B is a local
      directory with the same architecture under another name (a copy or a fine-tune of the base), or
      B is a hub id / a path from another machine while M records no hub id. The target-module and
      shape checks that follow still refuse an adapter that cannot fit the model.
    """
    if not isinstance(base, str) or not base.strip():
        log.warning(
            "model.adapter %s records no base_model_name_or_path; cannot check that it was made for "
            "model.path %s, using it anyway",
            adapter,
            model_path,
        )
        return
    base = base.strip().rstrip("/\\") or base
    model_dir = Path(model_path)
    names, hub_ids = _model_names(model_dir)
    base_dir = Path(base)
    base_is_local = base_dir.is_dir() and (base_dir / "config.json").is_file()
    base_name = base.replace("\\", "/").rsplit("/", 1)[-1].lower()
    if base_is_local:
        if base_dir.resolve() == model_dir.resolve():
            return
        base_arch, model_arch = _architecture(base_dir), _architecture(model_dir)
        if base_arch is not None and model_arch is not None and base_arch != model_arch:
            differing = sorted(
                (k for k in set(base_arch) | set(model_arch) if base_arch.get(k) != model_arch.get(k)),
                key=lambda k: (k != "model_type", k),
            )
            shown = ", ".join(f"{k}: {base_arch.get(k)!r} vs {model_arch.get(k)!r}" for k in differing[:4])
            raise TributaryError(
                f"model.adapter {adapter} was made for base model {base}, not model.path {model_path} "
                f"(their config.json differ: {shown}); use the adapter's base model as model.path or an adapter "
                "trained on this model"
            )
        _, base_hub_ids = _model_names(base_dir)
        if base_name in names or base_hub_ids & hub_ids:
            return
        log.warning(
            "model.adapter %s was made for %s and model.path is %s: another directory with the same "
            "architecture (a copy or a fine-tune?); using the adapter",
            adapter,
            base,
            model_path,
        )
        return
    if base_name in names or base.lower() in hub_ids:
        return
    if _HUB_ID.match(base) and hub_ids:
        raise TributaryError(
            f"model.adapter {adapter} was made for base model {base}, not model.path {model_path} "
            f"(known as {', '.join(sorted(hub_ids))}); use the adapter's base model as model.path or an adapter "
            "trained on this model"
        )
    log.warning(
        "model.adapter %s names base model %s; cannot tell whether model.path %s is that model "
        "(no matching name, and the base is not a local directory); using the adapter",
        adapter,
        base,
        model_path,
    )


def _check_target_modules(model: nn.Module, adapter: str, adapter_config: dict, model_path: str | None) -> None:
    """Every module the adapter targets must exist in the model (peft's matching: exact name or name suffix)."""
    targets = adapter_config.get("target_modules")
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        if any(re.fullmatch(targets, name) for name in names):
            return
        missing = [targets]
    elif isinstance(targets, (list, tuple)):
        missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    else:
        return  # peft derives the targets from the model type; it refuses what it cannot match
    if missing:
        leaves = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
            }
        )
        raise TributaryError(
            f"model.adapter {adapter} targets modules {missing} that model.path {model_path} does not have "
            f"(its linear layers are named {', '.join(leaves[:12])}); the adapter was made for another "
            "architecture — use its base model"
        )

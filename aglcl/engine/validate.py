"""Check a composed ``aglcl train`` config before anything is loaded or written.

    from aglcl.engine.validate import check_train_config
    check_train_config(cfg)          # raises AglclError naming the full key, the value and what is allowed

Three checks, all from what the code itself declares (no second schema to keep in sync):

* **Top-level keys**: the run's own options (:class:`RunConfig`) and the config groups of ``train.yaml``.
  A key nothing reads (``+lr=1e-4``) is refused with the closest valid keys.
* **Run options** (``resume``, ``stop_after``, ``checkpoint.*``, ``evaluation.*``, ``limit.*``, ...): typed and ranged here.
* **Every ``_target_`` node**, anywhere in the tree: each key must be a parameter of the target (unless it
  takes ``**kwargs``) and each value must match the parameter's annotation (``int``, ``float``, ``str``,
  ``bool``, ``X | None``, ``list[...]``, ``Literal[...]``). So ``trainer.lr=abc``, ``method.lam=abc``,
  ``trainer.batch_size=2.5`` or ``+trainer.lrr=1`` fail in one line, before the model loads.

Range checks that need the values (``lr > 0``) stay in each target's own ``__post_init__`` / ``__init__``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
from dataclasses import dataclass, field, fields

from omegaconf import DictConfig, ListConfig, OmegaConf

from aglcl.errors import AglclError, choices

# The config groups of conf/train.yaml that put a node of their own at the top level.
GROUPS = ("paths", "model", "sequence", "attribution", "method", "trainer", "distributed", "peft", "logger")
_SKIP = ("hydra",)  # Hydra's own node, present when the config is composed with it


@dataclass
class CheckpointConfig:
    every_task: bool = True
    every_steps: int | None = None

    def check(self, key: str) -> None:
        if self.every_steps is not None and self.every_steps < 0:
            raise AglclError(f"{key}.every_steps={self.every_steps} is invalid: must be >= 1, or 0/null (off)")


@dataclass
class EvaluationConfig:
    """Which tasks each stage scores (``evaluation.*``; :meth:`tasks_after` says which)."""

    tasks: typing.Literal["all", "seen", "past"] = "all"
    every: int = 1
    split: typing.Literal["eval", "test"] | None = None  # None: each task's eval_split; eval: for tuning
    bootstrap: int = 1000  # resamples of the test examples for each metric's CI in results.json; 0: none
    confidence: float = 0.95

    def check(self, key: str) -> None:
        if self.every < 1:
            raise AglclError(f"{key}.every={self.every} is invalid: must be >= 1 (1: score after every task)")
        if self.bootstrap < 0:
            raise AglclError(f"{key}.bootstrap={self.bootstrap} is invalid: must be >= 0 (0: no CI)")
        if not 0 < self.confidence < 1:
            raise AglclError(f"{key}.confidence={self.confidence} is invalid: must lie in (0, 1), e.g. 0.95")

    def tasks_after(self, t: int, T: int) -> list[int]:
        """The 0-based tasks scored after training task ``t`` (1-based) of ``T``.

        A full stage (every ``every``-th task, and the last) scores ``all`` tasks, the ``seen`` ones (trained
        so far, and the next: every metric, only R above its superdiagonal left empty) or the ``past`` ones
        (trained so far: no FWT). A stage in between scores the task just trained and, unless ``past``, the
        next one: R's diagonal and superdiagonal, which BWT, plasticity and FWT need (forgetting and AIA need
        the rows in between). The initial evaluation always scores every task (b).
        """
        nxt = [t] if t < T and self.tasks != "past" else []
        if t % self.every and t != T:
            return [t - 1, *nxt]
        return list(range(T)) if self.tasks == "all" else [*range(t), *nxt]


@dataclass
class LimitConfig:
    train: int | None = None
    eval: int | None = None

    def check(self, key: str) -> None:
        for name in ("train", "eval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AglclError(f"{key}.{name}={value} is invalid: must be >= 1 or null (no cap)")


@dataclass
class RunConfig:
    """The run's own top-level options (``conf/train.yaml``), typed. Built by :func:`run_config`."""

    tags: list[str] = field(default_factory=list)
    data_seed: int = 0
    order: str | None = None
    resume: bool | typing.Literal["force"] = False
    overwrite: bool = False
    stop_after: int | None = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    limit: LimitConfig = field(default_factory=LimitConfig)


_UNRESOLVED = object()


def _get(node, name):
    """``node[name]``, or :data:`_UNRESOLVED` when it is an interpolation that cannot resolve yet (e.g.
    ``${hydra:runtime.output_dir}`` outside a Hydra run): that value is the target's to check."""
    from omegaconf.errors import InterpolationResolutionError

    try:
        return node[name]
    except InterpolationResolutionError:
        return _UNRESOLVED


def _closest(key: str, valid) -> str:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(valid), n=3, cutoff=0.5)
    return f"did you mean {choices(close)}? " if close else ""


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin in (list, tuple, typing.Sequence):
        return "a list"
    if origin in (dict, typing.Mapping):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _matches(value, annotation) -> bool:
    """Whether a config value fits a type annotation. Unknown annotations accept anything."""
    if value is _UNRESOLVED or annotation in (inspect.Parameter.empty, typing.Any, object):
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if isinstance(value, DictConfig) and "_target_" in value:
        return True  # a nested object: checked as its own node
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, ListConfig | list | tuple):
            return False
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return len(args) != 1 or all(_matches(v, args[0]) for v in value)
    if origin in (dict, typing.Mapping) or annotation is dict:
        return isinstance(value, DictConfig | dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True  # a class we do not model (a tokenizer, a module): the target checks it


def _check_value(key: str, value, annotation) -> None:
    if not _matches(value, annotation):
        shown = repr(value) if not isinstance(value, DictConfig | ListConfig) else OmegaConf.to_yaml(value).strip()
        raise AglclError(f"{key}={shown} is invalid: must be {_type_name(annotation)}")


def _signature(target: str, key: str):
    """``(parameters, type hints, takes **kwargs)`` of a target; a class's ``**kwargs`` passed on to its bases
    (``super().__init__(**kwargs)``) contribute the bases' parameters."""
    module_name, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise AglclError(f"{key}._target_={target!r} cannot be imported ({exc})") from None
    chain = [c.__init__ for c in obj.__mro__ if "__init__" in vars(c) and c is not object] if inspect.isclass(obj) else [obj]
    params, hints = {}, {}
    for init in chain:
        sig, own = _one_signature(init)
        if sig is None:
            return params, hints, True
        for name, p in sig.parameters.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in params:
                params[name], hints[name] = p, own.get(name, p.annotation)
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return params, hints, False
    return params, hints, True


def _one_signature(init):
    try:
        sig = inspect.signature(init)
    except (TypeError, ValueError):
        return None, {}
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # one forward reference we cannot evaluate: evaluate the others one by one
        namespace = vars(inspect.getmodule(init) or typing)
        hints = {}
        for name, param in sig.parameters.items():
            try:
                hints[name] = typing.get_type_hints(types.SimpleNamespace(__annotations__={name: param.annotation}),
                                                    globalns=namespace)[name]
            except Exception:
                pass  # checked by name only
    return sig, hints


def check_target_node(node: DictConfig, key: str) -> None:
    """``node``'s keys against its ``_target_``'s signature, recursively into nested nodes."""
    params, hints, open_kwargs = _signature(str(node["_target_"]), key)
    for name in node:
        name = str(name)
        if name.startswith("_"):
            continue
        full = f"{key}.{name}"
        if name not in params:
            if not open_kwargs:
                raise AglclError(f"{full} is not an option of {node['_target_']}; {_closest(name, params)}"
                                 f"valid keys: {choices(params) or 'none'}")
        else:
            if OmegaConf.is_missing(node, name):
                raise AglclError(f"{full} is required (it is '???'); set {full}=...")
            value = _get(node, name)
            if value is not _UNRESOLVED:
                _check_value(full, value, hints[name])
    _walk(node, key)


def _walk(node, key: str) -> None:
    """Check every ``_target_`` node below ``node`` (not ``node`` itself)."""
    if isinstance(node, DictConfig):
        for name in node:
            if OmegaConf.is_missing(node, name):
                continue
            child = _get(node, name)
            if isinstance(child, DictConfig) and "_target_" in child:
                check_target_node(child, f"{key}.{name}" if key else str(name))
            elif isinstance(child, DictConfig | ListConfig):
                _walk(child, f"{key}.{name}" if key else str(name))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node):
            if isinstance(child, DictConfig) and "_target_" in child:
                check_target_node(child, f"{key}[{i}]")
            elif isinstance(child, DictConfig | ListConfig):
                _walk(child, f"{key}[{i}]")


def _build(cls, node, key: str):
    """A dataclass from a config node: unknown keys and wrong types refused, nested dataclasses built."""
    if node is None:
        return cls()
    if not isinstance(node, DictConfig | dict):
        raise AglclError(f"{key}={node!r} is invalid: must be a mapping with keys {choices(f.name for f in fields(cls))}")
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in fields(cls)}
    values = {}
    for name in node:
        name = str(name)
        full = f"{key}.{name}" if key else name
        if name not in valid:
            continue  # the caller decides what else may be there (groups, at the top level)
        value = node[name]
        if inspect.isclass(hints[name]) and hasattr(hints[name], "__dataclass_fields__"):
            unknown = [str(k) for k in (value or {}) if str(k) not in {f.name for f in fields(hints[name])}]
            if unknown:
                sub = [f.name for f in fields(hints[name])]
                raise AglclError(f"{full}.{unknown[0]} is not an option; {_closest(unknown[0], sub)}valid keys: "
                                 f"{choices(sub)}")
            values[name] = _build(hints[name], value, full)
            values[name].check(full)
        else:
            _check_value(full, value, hints[name])
            values[name] = OmegaConf.to_object(value) if isinstance(value, DictConfig | ListConfig) else value
    return cls(**values)


def run_config(cfg: DictConfig, num_tasks: int | None = None) -> RunConfig:
    """The typed :class:`RunConfig` of ``cfg``; ``stop_after`` is checked against ``num_tasks`` when given."""
    run = _build(RunConfig, cfg, "")
    if run.stop_after is not None:
        top = num_tasks if num_tasks is not None else "T"
        if run.stop_after < 1 or (num_tasks is not None and run.stop_after > num_tasks):
            raise AglclError(f"stop_after={run.stop_after} is invalid: must be a task count in 1..{top} "
                             f"(the sequence has {top} tasks), or null (run them all)")
    if run.overwrite and run.resume:
        raise AglclError(f"overwrite=true and resume={str(run.resume).lower()} contradict each other: overwrite "
                         "starts the run dir afresh, resume continues it; choose one")
    return run


# Groups whose objects are cheap to build (no weights, no data): building them runs their own range checks.
BUILT = ("trainer", "method", "attribution", "distributed")


def build(node, **kwargs):
    """``hydra.utils.instantiate(node)``, with a user error raised by the target (e.g. its range check)
    re-raised as itself rather than wrapped in Hydra's ``InstantiationException``."""
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except Exception as exc:
        cause = exc
        while cause is not None and not isinstance(cause, AglclError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def build_cheap(cfg: DictConfig) -> None:
    """Instantiate (and drop) the :data:`BUILT` groups, so their ``__init__`` checks (``lr > 0``, a mode's
    choices) run before anything is written."""
    for group in BUILT:
        node = cfg.get(group)
        if isinstance(node, DictConfig) and node.get("_target_"):
            try:
                build(node)
            except AglclError:
                raise
            except Exception as exc:
                raise AglclError(f"{group}: {exc}") from None


def check_train_config(cfg: DictConfig, build: bool = False) -> RunConfig:
    """Refuse unknown keys and mistyped values anywhere in a composed ``train`` config; returns the run options.
    ``build=True`` also runs the range checks of the cheap groups (:func:`build_cheap`)."""
    valid = {f.name for f in fields(RunConfig)} | set(GROUPS)
    for name in cfg:
        name = str(name)
        if name not in valid and name not in _SKIP:
            owners = [f"{g}.{name}" for g in GROUPS if isinstance(cfg.get(g), DictConfig) and name in cfg[g]]
            hint = f"did you mean {choices(owners)}? " if owners else _closest(name, valid)
            raise AglclError(f"'{name}' is not a config key of aglcl train, so nothing would read it; {hint}"
                             f"valid top-level keys: {choices(valid)} (a group's options are set as "
                             "group.key=value, e.g. trainer.lr=1e-4)")
    order = OmegaConf.select(cfg, "sequence.order")
    num_tasks = len(order) if isinstance(order, ListConfig) else None
    run = run_config(cfg, num_tasks)
    for group in GROUPS:
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            if "_target_" in node and node["_target_"] is not None:
                check_target_node(node, group)
            else:
                _walk(node, group)
    if build:
        build_cheap(cfg)
    return run

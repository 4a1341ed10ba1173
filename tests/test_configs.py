"""Every option of every config group composes, and every ``_target_`` binds its arguments (no weights loaded)."""

from __future__ import annotations

import importlib
import inspect

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from aglcl.commands.ls import config_groups
from aglcl.paths import conf_dir

PRIMARY = ("train", "eval", "ls", "data")
SKIP = {"hydra", "task"}  # hydra/ is Hydra's own; task/ options are composed through sequences below


def _targets(node, path="cfg"):
    if OmegaConf.is_dict(node):
        if node.get("_target_"):
            yield path, node
        for key in node:
            yield from _targets(node._get_node(key), f"{path}.{key}")
    elif OmegaConf.is_list(node):
        for i, item in enumerate(node):
            yield from _targets(item, f"{path}[{i}]")


def _resolve(target: str):
    module, _, attr = target.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _check_binds(cfg) -> int:
    n = 0
    for _path, node in _targets(cfg):
        fn = _resolve(node._target_)
        kwargs = {k: None for k in node if not str(k).startswith("_") and not OmegaConf.is_missing(node, k)}
        if not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
            inspect.signature(fn).bind_partial(**kwargs)  # raises TypeError on an unknown key
        n += 1
    return n


def _compose(name: str, overrides=()):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _options():
    for group, options in config_groups().items():
        if group.split("/")[0] in SKIP:
            continue
        for option in options:
            yield group, option


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_configs_compose(name):
    cfg = _compose(name)
    assert cfg is not None


@pytest.mark.parametrize(("group", "option"), list(_options()))
def test_every_group_option_composes_and_binds(group, option):
    overrides = [f"{group}={option}"]
    if group == "model" and option == "hub":
        overrides.append("model.name_or_path=some/model")
    cfg = _compose("train", overrides)
    assert cfg is not None
    assert _check_binds(cfg) >= 2  # at least trainer and method


@pytest.mark.parametrize("option", config_groups()["task"])
def test_every_task_option_composes_into_a_sequence(option):
    cfg = _compose("train", [f"+task@sequence.tasks.extra={option}"])
    task = cfg.sequence.tasks.extra
    assert {"source", "template", "metric", "scoring"} <= set(task)
    _check_binds(task)


def test_every_yaml_starts_with_a_command_comment():
    for path in sorted(conf_dir().rglob("*.yaml")):
        lines = [line for line in path.read_text().splitlines() if not line.startswith("# @package")]
        starts = ("# aglcl", "# torchrun", "# accelerate launch", "# A task")  # the command that uses it
        assert lines and lines[0].startswith(starts), path


def test_default_experiment_is_offline_agft_on_three_tasks():
    cfg = _compose("train")
    assert cfg.model.name_or_path.startswith("packaged://")
    assert cfg.method._target_.endswith("AGFT") and cfg.attribution.estimator._target_.endswith("LRP")
    assert len(cfg.sequence.order) >= 3
    assert set(cfg.sequence.order) <= set(cfg.sequence.tasks)

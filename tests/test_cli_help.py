"""The CLI's help texts name only commands that exist, and flags a command would ignore are refused."""
from __future__ import annotations

import argparse
import inspect
import re

import pytest

from meanflow.cli import build_parser
from meanflow.cli.fid_stats import check_flags_apply
from meanflow.config import load_config
from meanflow.data import check_keys_read
from meanflow.evaluation.run import check_options_apply


def _texts(parser: argparse.ArgumentParser):
    yield from (parser.description or "", parser.epilog or "", parser.usage or "")
    for action in parser._actions:
        yield action.help or ""
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield choice.help or ""
            for sub in action.choices.values():
                yield from _texts(sub)


def test_help_names_only_existing_commands():
    parser = build_parser()
    commands = set(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)
    named = {m for text in _texts(parser) for m in re.findall(r"meanflow ([a-z][a-z-]*)", text)}
    assert named and named <= commands, f"help names commands that do not exist: {sorted(named - commands)}"


def test_overriding_data_name_drops_the_presets_keys_the_new_source_does_not_read():
    cfg = load_config("toy", ["data.name=digits"])  # toy.yaml sets data.holdout, which digits does not read
    assert cfg.data.holdout == type(cfg.data)().holdout
    check_keys_read(cfg.data)
    cfg = load_config("digits", ["data.name=folder", "data.path=x"])  # image_size stays: folder reads it
    assert cfg.data.image_size == 8


def test_every_data_key_is_read_by_some_source():
    """A new data.* key must be filed with the sources that read it, or it would be refused everywhere."""
    import dataclasses

    from meanflow.config import DataConfig
    from meanflow.data import sources

    read = {"name", "conditional"} | {key for source in sources().values() for key in source.reads}
    assert {f.name for f in dataclasses.fields(DataConfig)} == read


def test_image_options_on_a_point_run_and_inception_weights_alone_are_refused():
    with pytest.raises(ValueError, match=r"--save-samples.*points.*checkerboard"):
        check_options_apply({"kind": "points", "name": "checkerboard"}, save_samples="s")
    with pytest.raises(ValueError, match=r"--inception-weights.*--fid-stats"):
        check_options_apply({"kind": "images", "name": "digits"}, inception_weights="w.pth")
    check_options_apply({"kind": "images", "name": "digits"}, fid_stats="ref.npz", inception_weights="w.pth")


def test_class_and_labels_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--run", "r", "--out", "s.npz", "--class", "1", "--labels", "0,1"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_fid_stats_flags_are_read_only_where_they_apply():
    parse = build_parser().parse_args
    check_flags_apply(parse(["fid-stats", "digits", "--image-size", "8", "--out", "s.npz"]))
    with pytest.raises(ValueError, match=r"--download.*cifar10"):
        check_flags_apply(parse(["fid-stats", "digits", "--download", "--out", "s.npz"]))
    with pytest.raises(ValueError, match=r"--weights.*--feature inception"):
        check_flags_apply(parse(["fid-stats", "digits", "--feature", "digits", "--weights", "w.pth", "--out", "s.npz"]))


def test_an_options_default_and_range_are_declared_once_and_read_everywhere():
    from meanflow.config import ConfigError, EvalConfig, TrainConfig, declared_option
    from meanflow.sampling import generate

    batch = declared_option(EvalConfig, "batch_size")
    assert build_parser().parse_args(["sample", "--run", "r", "--out", "s.npz"]).batch_size == batch.default == EvalConfig().batch_size
    assert inspect.signature(generate).parameters["batch_size"].default == batch.default
    workers = declared_option(TrainConfig, "num_workers")
    with pytest.raises(ConfigError, match=rf"train.num_workers must be an integer >= 0; got -1 \({workers.doc}\)"):
        load_config("toy", ["train.num_workers=-1"])


def test_every_shipped_preset_sets_only_data_keys_its_source_reads():
    from meanflow.config import available_configs

    for name in available_configs():
        check_keys_read(load_config(name).data)

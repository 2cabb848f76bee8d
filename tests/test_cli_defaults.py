"""The command line states the defaults and choices of the configs it fills: they cannot drift apart."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import fields

from biosam2.cli import _train_config, build_parser
from biosam2.data.convert import CONVERTERS, SOURCE_LABEL_MAPS
from biosam2.model.config import ModelConfig
from biosam2.training.config import TrainConfig

YAML_ONLY = {"overlays"}  # TrainConfig options that only a --config file sets


def subcommand(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def train_options() -> dict[str, argparse.Action]:
    return {a.dest: a for a in subcommand("train")._actions if a.option_strings and a.dest in {f.name for f in fields(TrainConfig)}}


def test_train_options_given_nothing_make_the_default_config():
    args = build_parser().parse_args(["train", "data", "--out", "run"])
    assert _train_config(args) == TrainConfig()


def test_train_help_states_trainconfigs_own_defaults():
    stated = {}
    for dest, action in train_options().items():
        found = re.search(r"\(default ([^)]*)\)$", " ".join((action.help or "").split()))
        if found:
            stated[dest] = found.group(1)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    flags = {dest for dest, a in train_options().items() if a.nargs == 0}  # --no-test, --no-augment, ...
    assert set(stated) == set(train_options()) - flags  # every valued option says its default
    wrong = {d: (text, defaults[d]) for d, text in stated.items() if defaults[d] is not None and text != str(defaults[d])}
    assert not wrong, wrong
    # a default of None reads as what it means ("all", "native resolution"), never as "None"
    assert all(text != "None" for text in stated.values())


def test_every_trainconfig_option_is_on_the_command_line():
    assert set(train_options()) == {f.name for f in fields(TrainConfig)} - YAML_ONLY


def test_trainconfig_model_defaults_are_modelconfigs():
    model = ModelConfig()
    train = TrainConfig()
    assert train.model_options() == {name: getattr(model, name) for name in train.model_options()}


def test_convert_offers_exactly_the_registered_converters_and_label_maps():
    convert = subcommand("convert")
    actions = {a.dest: a for a in convert._actions}
    assert list(actions["name"].choices) == list(CONVERTERS)
    assert list(actions["source_labels"].choices) == list(SOURCE_LABEL_MAPS)


def test_building_the_parser_does_not_import_torch():
    """`biosam2 -h` answers at once: the configs it reads its defaults from load without torch."""
    code = "import sys, biosam2.cli as c; c.build_parser(); print(sorted({'torch', 'transformers', 'lightning'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"

"""Configuration: defaults, YAML overrides, --set, and errors that name the key, the source and the choices."""
import subprocess
import sys

import pytest

from pipeline.config import load_config, reference, section_hash
from pipeline.errors import ConfigError


def test_defaults_then_file_then_set(tmp_path):
    override = tmp_path / "exp.yaml"
    override.write_text("experiment: trial\ntrain:\n  max_steps: 7\n  channels: [8, 16]\n")
    cfg = load_config([override], ["train.max_steps=9", "preprocess.target_spacing=[2, 2, 3]"])
    assert cfg.experiment == "trial"
    assert cfg.train.max_steps == 9            # --set wins over the file
    assert cfg.train.channels == [8, 16]       # the file wins over the default
    assert cfg.preprocess.target_spacing == [2.0, 2.0, 3.0]
    assert cfg.train.learning_rate == load_config().train.learning_rate  # untouched default


def test_unknown_key_names_file_and_valid_choices(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stpes: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config([bad])
    message = str(info.value)
    assert "train.max_stpes" in message and str(bad) in message and "max_steps" in message


@pytest.mark.parametrize("override, fragment", [
    ("train.folds=abc", "must be an integer"),
    ("train.max_steps=abc", "must be int or one of .auto."),
    ("train.mode=4d", "must be one of '3d', '2d'"),
    ("preprocess.crop_to_body=maybe", "must be true or false"),
    ("preprocess.target_spacing=3", "must be a list"),
])
def test_wrong_types_are_rejected(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config([], [override])


def test_yaml_is_data_only(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("experiment: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([evil])


@pytest.mark.parametrize("args", [["config", "--set", "train.nope=1"], ["config", "--set", "train.max_steps=x"]])
def test_cli_config_error_exit_code_2_one_line(args):
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctseg: error:")
    assert "Traceback" not in result.stderr


def test_hash_changes_only_with_relevant_section():
    base = load_config()
    changed_train = load_config([], ["train.max_steps=1"])
    assert section_hash(base.preprocess) == section_hash(changed_train.preprocess)
    assert section_hash(base.train) != section_hash(changed_train.train)


def test_every_setting_is_documented():
    undocumented = [key for key, _, _, help_text in reference() if not help_text]
    assert undocumented == []

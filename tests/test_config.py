import pytest

from facepipe.config import ConfigError, find_config, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_demo_config_loads_with_stages():
    config = load_config(find_config("demo"))
    assert config.train.total_epochs == sum(stage.epochs for stage in config.train.stages)
    # Softmax warm start, then a margin head (Khan et al. Sec. 6.1.1 trains softmax first).
    assert config.train.stages[0].head.type == "softmax" and len(config.train.stages) == 2
    assert config.train.stages[1].head.type in ("cosface", "arcface", "lsoftmax", "sphereface")
    assert config.demo is not None and config.demo.identities > config.demo.heldout_identities


def test_unknown_key_names_key_and_valid_choices(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "data:\n  batchsize: 3\n"))
    message = str(info.value)
    assert "batchsize" in message and "batch_size" in message and "num_workers" in message


def test_unknown_head_type_lists_valid_heads(tmp_path):
    path = write(tmp_path, "train:\n  stages:\n    - {epochs: 1, head: {type: magic}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "magic" in str(info.value) and "arcface" in str(info.value) and "lsoftmax" in str(info.value)


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "optim:\n  lr: fast\n"))
    assert "optim.lr" in str(info.value)


def test_unknown_head_parameter_is_rejected(tmp_path):
    path = write(tmp_path, "train:\n  stages:\n    - {epochs: 1, head: {type: cosface, margin: 0.3}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "margin" in str(info.value) and "'m'" in str(info.value)


def test_overrides_set_nested_and_list_items():
    config = load_config(find_config("demo"), ["train.stages.1.epochs=3", "data.image_size=[112,96]", "optim.name=adamw"])
    assert config.train.stages[1].epochs == 3
    assert config.data.image_size == (112, 96)
    assert config.optim.name == "adamw"


@pytest.mark.parametrize("override", ["noequals", "=3", "data.image_size=[100,100]", "model.depth=19",
                                      "data.sampler=random"])
def test_bad_overrides_are_config_errors(override):
    with pytest.raises(ConfigError):
        load_config(find_config("demo"), [override])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not found"):
        find_config("no_such_config_name")


def test_empty_schedule_rejected(tmp_path):
    with pytest.raises(ConfigError, match="at least one stage"):
        load_config(write(tmp_path, "train:\n  stages: []\n"))


def test_stage_at_maps_epochs_to_stages():
    config = load_config(find_config("demo"), ["train.stages.0.epochs=2", "train.stages.1.epochs=3"])
    assert [config.train.stage_at(e)[0] for e in range(5)] == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError):
        config.train.stage_at(5)


def test_yaml_round_trip(tmp_path):
    config = load_config(find_config("demo"))
    path = write(tmp_path, config.to_yaml())
    assert load_config(path) == config

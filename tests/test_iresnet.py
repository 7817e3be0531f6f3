"""arch: iresnet (insightface arcface_torch's IResNet) and `facepipe import-weights`.

The published layout is written out here from arcface_torch's structure (stem conv1/bn1/prelu;
layer1..4 of 64/128/256/512 channels whose first block strides by 2 and projects its input
through downsample.0/.1; blocks bn1, conv1, bn2, prelu, conv2, bn3; then bn2, fc, features),
independently of facepipe's module, and so is a forward pass of it in torch.nn.functional ops.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from facepipe.cli import main
from facepipe.config import ConfigError, config_from_dict, find_config, load_config
from facepipe.losses.uncertainty import mc_embeddings
from facepipe.models import build_backbone
from facepipe.models.foreign import ForeignWeightsError, read_state_dict
from facepipe.models.iresnet import IResidualBlock, IResNet
from facepipe.models.loaded import load_model
from facepipe.runtime.checkpoint import load_checkpoint

R18_BLOCKS = (2, 2, 2, 2)


def published_shapes(blocks=R18_BLOCKS, embedding=512, positions=7 * 7) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an arcface_torch IResNet state dict, in state-dict order."""
    shapes: dict[str, tuple[int, ...]] = {}

    def norm(name, channels):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{leaf}"] = (channels,)
        shapes[f"{name}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 3, 3)
    norm("bn1", 64)
    shapes["prelu.weight"] = (64,)
    previous = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for index in range(count):
            name, incoming = f"layer{stage}.{index}", previous if index == 0 else planes
            norm(f"{name}.bn1", incoming)
            shapes[f"{name}.conv1.weight"] = (planes, incoming, 3, 3)
            norm(f"{name}.bn2", planes)
            shapes[f"{name}.prelu.weight"] = (planes,)
            shapes[f"{name}.conv2.weight"] = (planes, planes, 3, 3)
            norm(f"{name}.bn3", planes)
            if index == 0:
                shapes[f"{name}.downsample.0.weight"] = (planes, incoming, 1, 1)
                norm(f"{name}.downsample.1", planes)
        previous = planes
    norm("bn2", 512)
    shapes["fc.weight"] = (embedding, 512 * positions)
    shapes["fc.bias"] = (embedding,)
    norm("features", embedding)
    return shapes


def random_published_weights(seed=0, **layout) -> dict[str, torch.Tensor]:
    """Weights of the published layout that keep activations in range (He-scaled kernels)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in published_shapes(**layout).items():
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.tensor(1000 + len(weights), dtype=torch.long)
        elif key == "features.weight":
            weights[key] = torch.ones(shape)  # published: fixed at 1.0
        elif key.endswith("running_var"):
            weights[key] = 0.5 + torch.rand(shape, generator=generator)
        elif key.endswith(("running_mean", "bias")):
            weights[key] = 0.1 * torch.randn(shape, generator=generator)
        elif key.endswith("prelu.weight"):
            weights[key] = 0.25 + 0.05 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:  # BatchNorm scale
            weights[key] = 0.8 + 0.4 * torch.rand(shape, generator=generator)
        else:
            fan_in = int(np.prod(shape[1:]))
            weights[key] = torch.randn(shape, generator=generator) * (1.0 / fan_in) ** 0.5
    return weights


def reference_forward(weights, images, blocks=R18_BLOCKS):
    """arcface_torch's IResNet forward in eval mode, in functional ops on the state dict."""
    def norm(x, name):
        return F.batch_norm(x, weights[f"{name}.running_mean"], weights[f"{name}.running_var"],
                            weights[f"{name}.weight"], weights[f"{name}.bias"], training=False, eps=1e-05)

    x = F.prelu(norm(F.conv2d(images, weights["conv1.weight"], padding=1), "bn1"), weights["prelu.weight"])
    for stage, count in enumerate(blocks, start=1):
        for index in range(count):
            name, stride = f"layer{stage}.{index}", 2 if index == 0 else 1
            out = F.conv2d(norm(x, f"{name}.bn1"), weights[f"{name}.conv1.weight"], padding=1)
            out = F.prelu(norm(out, f"{name}.bn2"), weights[f"{name}.prelu.weight"])
            out = norm(F.conv2d(out, weights[f"{name}.conv2.weight"], stride=stride, padding=1), f"{name}.bn3")
            if index == 0:
                x = norm(F.conv2d(x, weights[f"{name}.downsample.0.weight"], stride=stride),
                         f"{name}.downsample.1")
            x = out + x
    x = F.linear(torch.flatten(norm(x, "bn2"), 1), weights["fc.weight"], weights["fc.bias"])
    return norm(x, "features")


def import_args(weights, out, *extra):
    return ["import-weights", "--arch", "iresnet", "--depth", "18", "--weights", str(weights), "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def r18_112(tmp_path_factory):
    """A published-layout iresnet18 (112x112) backbone.pth, its weights and its import."""
    folder = tmp_path_factory.mktemp("r18")
    weights = random_published_weights()
    torch.save(weights, folder / "backbone.pth")
    assert main(import_args(folder / "backbone.pth", folder / "model.pt")) == 0
    return folder, weights


def test_import_keeps_every_published_tensor_and_the_published_forward(r18_112, capsys):
    folder, weights = r18_112
    state = load_checkpoint(folder / "model.pt")
    assert state["config"]["model"]["arch"] == "iresnet" and state["config"]["model"]["depth"] == 18
    assert state["identities"] == [] and state["epoch"] == 0 and state["step"] == 0
    loaded = load_model(folder / "model.pt")
    model = loaded.model
    assert isinstance(model, IResNet)
    own = model.state_dict()
    assert list(own) == list(weights)  # same names, in the published order
    for key, tensor in weights.items():
        assert own[key].dtype == tensor.dtype and torch.equal(own[key], tensor), key
    assert not model.embedding_norm.weight.requires_grad  # published: frozen at 1.0
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # facepipe feeds (x - 127.5) / 128; the published network was trained on (x - 127.5) / 127.5
        expected = reference_forward(weights, images * 128.0 / 127.5)
        got = model(images)
        split = model.output_stage(model.features(images))
    assert expected.abs().mean() > 0.1  # not a degenerate (all-zero) comparison
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(split, got)


def test_imported_checkpoint_embeds_an_array_into_unit_rows(r18_112):
    folder, _ = r18_112
    loaded = load_model(folder / "model.pt")
    images = np.random.default_rng(0).standard_normal((3, 3, 112, 112)).astype(np.float32)
    rows = loaded.embed(images, flip="sum")
    assert rows.shape == (3, 512) and rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
    assert loaded.embed(images[:1], flip="none").shape == (1, 512)


def _only_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("change,named", [
    ("missing", "layer2.1.bn3.running_var"),
    ("unexpected", "layer4.1.se.weight"),
    ("shape", "fc.bias"),
])
def test_mismatched_weights_exit_2_naming_the_key(r18_112, tmp_path, capsys, change, named):
    _, weights = r18_112
    weights = dict(weights)
    if change == "missing":
        del weights[named]
    elif change == "unexpected":
        weights[named] = torch.zeros(512)
    else:
        weights[named] = torch.zeros(256)
    torch.save(weights, tmp_path / "backbone.pth")
    capsys.readouterr()
    assert main(import_args(tmp_path / "backbone.pth", tmp_path / "model.pt")) == 2
    line = _only_line(capsys.readouterr().err)
    assert line.startswith("facepipe import-weights: error: ") and named in line
    assert {"missing": "1 missing key(s)", "unexpected": "1 unexpected key(s)",
            "shape": "fc.bias file [256] vs model [512]"}[change] in line
    assert not (tmp_path / "model.pt").exists()


def test_mismatch_messages_say_which_options_would_fit(r18_112, tmp_path, capsys):
    folder, _ = r18_112
    capsys.readouterr()
    assert main(["import-weights", "--depth", "34", "--weights", str(folder / "backbone.pth"),
                 "--out", str(tmp_path / "a.pt")]) == 2
    line = _only_line(capsys.readouterr().err)
    assert "missing key(s) (layer1.2.bn1.weight" in line and "depth 18 (--depth 18)" in line
    assert main(import_args(folder / "backbone.pth", tmp_path / "b.pt", "--image-size", "112", "96",
                            "--embedding-size", "256")) == 2
    line = _only_line(capsys.readouterr().err)
    assert "fc.weight file [512, 25088] vs model [256, 21504]" in line
    assert "--embedding-size 512" in line and "--image-size 112 112" in line
    # an existing output is not replaced without --overwrite
    assert main(import_args(folder / "backbone.pth", folder / "model.pt")) == 2
    assert "--overwrite" in _only_line(capsys.readouterr().err)


def test_wrapped_state_dicts_are_unwrapped_only_when_unambiguous(tmp_path):
    weights = {"conv1.weight": torch.ones(2), "bn1.weight": torch.zeros(2)}

    def read(obj):
        torch.save(obj, tmp_path / "w.pth")
        return read_state_dict(tmp_path / "w.pth")

    for wrapped in (weights, {f"module.{k}": v for k, v in weights.items()},
                    {"epoch": 3, "state_dict_backbone": weights, "state_optimizer": {"state": {}}},
                    {"state_dict": {f"module.{k}": v for k, v in weights.items()}}):
        assert list(read(wrapped)) == list(weights)
    refusals = [
        ({"state_dict": weights, "state_dict_backbone": weights}, "exactly one of"),
        ({"model": weights, "epoch": 1}, "top-level keys: model, epoch"),
        ({"conv1.weight": torch.ones(2), "module.bn1.weight": torch.ones(2)}, "1 of 2 keys start with 'module.'"),
        ([torch.ones(2)], "holds a list"),
        ({}, "no weights"),
        ({"format_version": 1, "model": weights, "config": {}, "identities": [], "epoch": 0, "step": 0},
         "facepipe checkpoint already"),
    ]
    for obj, message in refusals:
        with pytest.raises(ForeignWeightsError, match=message):
            read(obj)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a whole model: never unpickled
    with pytest.raises(ForeignWeightsError, match="pickles objects other than tensors"):
        read_state_dict(tmp_path / "module.pth")
    (tmp_path / "text.pth").write_text("not a torch file")
    with pytest.raises(ForeignWeightsError, match="weights_only=True"):
        read_state_dict(tmp_path / "text.pth")


@pytest.mark.parametrize("depth,blocks,millions", [(18, 8, 24.0), (34, 16, 34.1), (50, 24, 43.6), (100, 49, 65.2),
                                                   (200, 98, 118.8)])
def test_depths_have_the_published_block_and_parameter_counts(depth, blocks, millions):
    config = config_from_dict({"model": {"arch": "iresnet", "depth": depth}})
    model = build_backbone(config.model, config.data.image_size)
    assert sum(isinstance(m, IResidualBlock) for m in model.modules()) == blocks
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)
    assert model.fc.in_features == 512 * 7 * 7 and model.embedding_size == 512


def test_config_refuses_what_iresnet_or_irse_cannot_build():
    with pytest.raises(ConfigError, match="depth 200 is only for arch iresnet"):
        config_from_dict({"model": {"arch": "irse", "depth": 200}})
    with pytest.raises(ConfigError, match="width must be 1.0"):
        config_from_dict({"model": {"arch": "iresnet", "width": 0.5}})
    with pytest.raises(ConfigError, match="multiples of 16 for the IResNet"):
        config_from_dict({"model": {"arch": "iresnet"}, "data": {"image_size": [100, 100]}})
    with pytest.raises(ConfigError, match="arch"):
        config_from_dict({"model": {"arch": "iresnet300"}})


def test_the_fine_tuning_example_config_validates():
    config = load_config(find_config("iresnet50_finetune"))
    assert (config.model.arch, config.model.depth, config.data.image_size) == ("iresnet", 50, (112, 112))
    assert config.train.init_from


def test_other_input_sizes_and_the_output_stage_for_mc_dropout():
    torch.manual_seed(0)
    model = IResNet(18, embedding_size=64, dropout=0.5, input_size=(112, 96))
    assert model.fc.in_features == 512 * 7 * 6 and "output_stage.fc.weight" not in model.state_dict()
    with pytest.raises(ValueError, match="112x96"):
        model(torch.randn(1, 3, 112, 112))
    model = IResNet(18, embedding_size=64, dropout=0.5, input_size=(32, 32)).eval()
    images = torch.randn(4, 3, 32, 32)
    maps = model.features(images)
    assert maps.shape == (4, 512, 2, 2)
    torch.testing.assert_close(model.output_stage(maps), model(images))
    samples = mc_embeddings(model.output_stage, maps, passes=3)  # dropout on, BatchNorm as it was
    assert samples.shape == (3, 4, 64) and not torch.allclose(samples[0], samples[1])
    assert not model.training and not model.dropout.training
    assert model.train().output_stage.training and model.output_stage.dropout.training


def test_init_from_an_imported_backbone_fine_tunes_it(tiny_dataset, tmp_path):
    from facepipe.train import Trainer

    weights = random_published_weights(positions=2 * 2)  # the tiny dataset's 32x32 crops
    torch.save(weights, tmp_path / "backbone.pth")
    assert main(import_args(tmp_path / "backbone.pth", tmp_path / "r18.pt", "--image-size", "32", "32")) == 0
    config = tiny_config(tiny_dataset, tmp_path / "fine",
                         model={"arch": "iresnet", "depth": 18, "width": 1.0, "embedding_size": 512},
                         optim={"lr": 0.01},
                         train={"init_from": str(tmp_path / "r18.pt"), "max_steps_per_epoch": 1,
                                "stages": [{"epochs": 1, "head": {"type": "arcface", "s": 16.0, "m": 0.2}}]})
    started = time.perf_counter()
    trainer = Trainer(config, progress=False)
    for key, tensor in weights.items():
        assert torch.equal(trainer.model.state_dict()[key], tensor), key
    classifier = trainer.head.weight.detach().clone()
    trainer.fit()
    assert trainer.global_step == 1 and time.perf_counter() - started < 120
    after = trainer.model.state_dict()
    assert not torch.equal(after["layer1.0.conv1.weight"], weights["layer1.0.conv1.weight"])  # trained
    assert torch.equal(after["features.weight"], weights["features.weight"])  # stays 1.0
    assert classifier.shape == (len(trainer.dataset.identities), 512)
    # the fine-tuned run is a checkpoint like any other
    assert load_model(tmp_path / "fine" / "latest.pt").embed(torch.randn(2, 3, 32, 32)).shape == (2, 512)

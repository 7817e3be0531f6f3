import pytest
import torch

from facepipe.models import IRSEBackbone
from facepipe.models.irse import IRSEUnit


@pytest.mark.parametrize("size", [(112, 112), (112, 96)])
def test_output_shapes_for_both_face_sizes(size):
    model = IRSEBackbone(depth=18, width=0.125, embedding_size=64, input_size=size).eval()
    images = torch.randn(2, 3, *size)
    maps = model.features(images)
    assert maps.shape == (2, model.feature_channels, size[0] // 16, size[1] // 16)
    assert model.feature_spatial == (7, 7) if size == (112, 112) else (7, 6)
    assert model(images).shape == (2, 64)


@pytest.mark.parametrize("depth,units", [(18, 8), (34, 16), (50, 24), (100, 49)])
def test_depths_have_the_ir_se_unit_counts(depth, units):
    model = IRSEBackbone(depth=depth, width=0.125, embedding_size=16, input_size=(32, 32))
    assert sum(isinstance(m, IRSEUnit) for m in model.modules()) == units


def test_width_multiplier_scales_channels():
    narrow = IRSEBackbone(depth=18, width=0.25, input_size=(32, 32))
    full = IRSEBackbone(depth=18, width=1.0, input_size=(32, 32))
    assert (narrow.feature_channels, full.feature_channels) == (128, 512)


def test_output_stage_alone_equals_forward_and_draws_fresh_dropout_masks():
    torch.manual_seed(0)
    model = IRSEBackbone(depth=18, width=0.125, embedding_size=16, dropout=0.5, input_size=(32, 32))
    images = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.allclose(model.output_stage(model.features(images)), model(images))
    # MC dropout: backbone in eval, output stage dropout active, two passes on one set of maps differ.
    maps = model.features(images)
    model.output_stage.dropout.train()
    first, second = model.output_stage(maps), model.output_stage(maps)
    assert not torch.allclose(first, second)


def test_wrong_input_size_and_depth_are_clear_errors():
    model = IRSEBackbone(depth=18, width=0.125, input_size=(32, 32))
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="depth"):
        IRSEBackbone(depth=19)
    with pytest.raises(ValueError, match="multiple of 16"):
        IRSEBackbone(depth=18, input_size=(100, 100))


def test_gradients_reach_the_stem():
    model = IRSEBackbone(depth=18, width=0.125, embedding_size=16, input_size=(32, 32))
    model(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    assert model.stem[0].weight.grad is not None and model.stem[0].weight.grad.abs().sum() > 0

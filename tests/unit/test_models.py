"""Backbones: the small CNN's pooling / fully connected ending, and the configs that build them."""

from __future__ import annotations

import pytest
import torch
from conftest import build
from omegaconf import OmegaConf
from torch import nn

from contrastive.models import SmallCNN, backbone_from_config, build_backbone


def test_global_average_ending_is_blind_to_where_a_pattern_sits():
    net = SmallCNN(1, width=8, depth=4).eval()
    assert net.out_dim == 32
    # the same blob moved by a multiple of the two poolings' stride, both copies away from the zero padding
    image = torch.zeros(1, 1, 40, 40)
    image[..., 12:16, 12:16] = 1
    moved = image.roll(shifts=(12, 12), dims=(2, 3))
    with torch.no_grad():
        a, b = net(image), net(moved)
    assert torch.allclose(a, b, atol=1e-5)


def test_pooled_map_and_fc_ending_keep_where_a_pattern_sits():
    net = SmallCNN(1, width=8, depth=4, pool_size=3, fc_dim=24).eval()
    assert net.out_dim == 24
    assert isinstance(net.net[-3], nn.Linear) and net.net[-3].in_features == 32 * 9
    image = torch.zeros(1, 1, 40, 40)
    image[..., 12:16, 12:16] = 1
    moved = image.roll(shifts=(12, 12), dims=(2, 3))
    with torch.no_grad():
        a, b = net(torch.cat([image, moved])).unbind()
    assert a.shape == (24,) and (a >= 0).all()  # after BN + ReLU
    assert (a - b).norm() > 0.5 * a.norm()


@pytest.mark.parametrize("size", [16, 28, 32])
def test_fc_ending_fits_any_image_size(size):
    net = SmallCNN(3, width=8, pool_size=3, fc_dim=16)
    assert net(torch.rand(4, 3, size, size)).shape == (4, 16)


def test_pool_only_ending_flattens_the_map():
    assert SmallCNN(1, width=8, pool_size=2).out_dim == 32 * 4


def test_bad_arguments_name_the_keys():
    with pytest.raises(ValueError, match="backbone.pool_size"):
        SmallCNN(1, pool_size=0)
    with pytest.raises(ValueError, match="backbone.name='vgg'"):
        build_backbone("vgg", 3)


def test_config_without_the_newer_keys_builds_the_global_average_cnn():
    # checkpoints written before pool_size / fc_dim existed hold a backbone config without them
    old = OmegaConf.create({"name": "small_cnn", "small_images": True, "width": 8, "depth": 4})
    net = backbone_from_config(old, 1)
    assert net.out_dim == 32 and not any(isinstance(m, nn.Linear) for m in net.modules())


def test_method_trains_with_the_fc_backbone(cfg_factory):
    cfg = cfg_factory("method=simclr", "backbone.pool_size=3", "backbone.fc_dim=16")
    model, dm = build(cfg)
    assert model.backbone.out_dim == 16 and model.probe.in_features == 16
    images, labels, index = next(iter(dm.train_dataloader()))
    loss = model.contrastive_loss(model.augment(images), model.step_context(index, labels)).loss
    loss.backward()
    fc = model.backbone.net[-3]
    assert torch.isfinite(loss) and fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0

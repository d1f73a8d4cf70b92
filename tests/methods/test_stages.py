"""Stage probes: the pooled output of each encoder stage, checked against a hand-written forward pass."""

from __future__ import annotations

import json

import torch
from conftest import make_cfg

from contrastive.metrics.stages import encoder_stages, stage_features
from contrastive.models import build_backbone
from contrastive.train import train


class Batches(list):
    """A loader of (images, labels, index) batches."""


def loader_of(x: torch.Tensor) -> Batches:
    return Batches([(x[:3], torch.arange(3), torch.arange(3)), (x[3:], torch.arange(3, len(x)), torch.arange(3))])


def test_resnet_stages_are_res2_to_res5_pooled():
    net = build_backbone("resnet18", 3, small_images=True).eval()
    assert list(encoder_stages(net)) == ["res2", "res3", "res4", "res5"]
    x = torch.randn(5, 3, 16, 16)
    feats, labels = stage_features(net, torch.nn.Identity(), loader_of(x), torch.device("cpu"))
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        h2 = net.layer1(h)
        h3 = net.layer2(h2)
        torch.testing.assert_close(feats["res2"], h2.mean(dim=(2, 3)))
        torch.testing.assert_close(feats["res3"], h3.mean(dim=(2, 3)))
        torch.testing.assert_close(feats["res5"], net(x))  # the backbone's own output: the last stage, pooled
    assert labels.tolist() == [0, 1, 2, 3, 4]
    assert net.training is False


def test_small_cnn_stages_are_its_conv_blocks():
    net = build_backbone("small_cnn", 1, width=4, depth=4).train()
    stages = encoder_stages(net)
    assert list(stages) == ["block1", "block2", "block3", "block4"]
    x = torch.randn(6, 1, 16, 16)
    feats, _ = stage_features(net, torch.nn.Identity(), loader_of(x), torch.device("cpu"))
    assert net.training  # restored
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats["block1"], net.net[:3](x).mean(dim=(2, 3)))
        torch.testing.assert_close(feats["block4"], net(x))  # pool_size 1, no fc: the output is the last block pooled
    assert [f.shape[1] for f in feats.values()] == [4, 8, 16, 16]


def test_a_run_with_eval_stages_records_every_stage(tmp_path):
    summary = train(
        make_cfg(
            ["trainer.max_epochs=1", "eval.stages=true", "eval.init=false", "eval.pixels=false"], tmp_path=tmp_path
        )
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["stages"] == ["block1", "block2", "block3", "block4"]
    for stage in saved["stages"]:
        for key in ("knn_acc", "knn_acc_1shot", "fewshot_linear_acc_10shot"):
            assert 0 <= saved[f"stage_{stage}_{key}"] <= 100
    # the last block, pooled, is the backbone's output: the same kNN as the run's own figure
    assert saved["stage_block4_knn_acc"] == summary["knn_acc"]

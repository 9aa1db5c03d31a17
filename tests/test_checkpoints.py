"""Own checkpoints round-trip; original BlockDrop and torchvision files import; misfits say why."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from blockdrop.checkpoints import load_models, read_checkpoint, save_checkpoint
from blockdrop.errors import UserError
from blockdrop.presets import get_preset

from conftest import randomize_batchnorm


def original_agent(policy_sd: dict, legacy_fc: bool = True) -> dict:
    """A policy state dict as the original code saved it: with `features.fc.*` and the value head."""
    sd = dict(policy_sd)
    feat = policy_sd["logit.weight"].shape[1]
    sd["vnet.weight"], sd["vnet.bias"] = torch.randn(1, feat), torch.randn(1)
    if legacy_fc:
        sd["features.fc.weight"], sd["features.fc.bias"] = torch.randn(10, feat), torch.randn(10)
    return sd


def test_a_damaged_checkpoint_is_refused_not_evaluated(tmp_path):
    """4 KB overwritten inside a tensor's bytes: torch.load still reads the file; its checksum does not match."""
    preset = get_preset("R26_DIGITS")
    backbone = preset.build_backbone()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, preset, backbone, preset.build_depth_policy(), {"stage": "finetune"})
    read_checkpoint(path)  # intact: reads
    data = bytearray(path.read_bytes())
    largest = max(backbone.state_dict().values(), key=lambda t: t.numel())
    start = data.find(largest.contiguous().view(-1).view(torch.uint8).numpy().tobytes()[:256])
    assert start > 0
    data[start + 512:start + 512 + 4096] = bytes(4096)
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # what made the damage silent: the file still loads
    with pytest.raises(UserError, match="is damaged"):
        read_checkpoint(path)


def drop_bn_counters(sd: dict) -> dict:
    """PyTorch 0.3 files have no BatchNorm `num_batches_tracked`."""
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def test_own_format_round_trips_weights_and_metadata(tmp_path):
    preset = get_preset("R32_C10")
    backbone, policy = randomize_batchnorm(preset.build_backbone()), preset.build_policy().eval()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, preset, backbone, policy, {"stage": "finetune", "epoch": 7, "metrics": {"acc": 0.9}})
    assert set(torch.load(path, weights_only=True)) == {"format", "preset", "meta", "backbone", "policy", "checksum"}
    loaded_backbone, loaded_policy, ckpt = load_models(preset, path)
    assert ckpt.source == "blockdrop" and ckpt.meta == {"stage": "finetune", "epoch": 7, "metrics": {"acc": 0.9}}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded_backbone.eval()(x), backbone(x))
        torch.testing.assert_close(loaded_policy.eval()(x), policy(x))


def test_save_with_unserialisable_metadata_fails_and_keeps_the_previous_file(tmp_path):
    preset = get_preset("R26_DIGITS")
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, preset, preset.build_backbone(), meta={"epoch": 1})
    with pytest.raises(TypeError):
        save_checkpoint(path, preset, preset.build_backbone(), meta={"epoch": object()})
    assert read_checkpoint(path).meta == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_checkpoint_of_another_preset_names_the_right_one(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, get_preset("R32_C10"), get_preset("R32_C10").build_backbone())
    with pytest.raises(UserError, match="saved for preset R32_C10, not R110_C10; pass --preset R32_C10"):
        load_models(get_preset("R110_C10"), path)


@pytest.mark.parametrize("policy_key", ["agent", "net"])
def test_original_blockdrop_file_loads_policy_and_resnet(tmp_path, policy_key):
    preset = get_preset("R32_C10")
    backbone, policy = randomize_batchnorm(preset.build_backbone()), randomize_batchnorm(preset.build_policy())
    path = tmp_path / "ckpt_E_100_A_0.886.t7"
    torch.save({policy_key: original_agent(drop_bn_counters(policy.state_dict())),
                "resnet": drop_bn_counters(backbone.state_dict()),
                "epoch": 100, "reward": torch.tensor([0.51]), "acc": np.float64(0.886)}, path)
    loaded_backbone, loaded_policy, ckpt = load_models(preset, path)
    assert ckpt.source == "blockdrop-original"
    assert ckpt.meta == pytest.approx({"epoch": 100, "reward": 0.51, "acc": 0.886})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded_backbone.eval()(x), backbone(x))
        torch.testing.assert_close(loaded_policy.eval()(x), policy(x))


def test_original_curriculum_file_needs_the_pretrained_resnet(tmp_path):
    preset = get_preset("R32_C10")
    policy_only = tmp_path / "cl.t7"
    torch.save({"agent": original_agent(preset.build_policy().state_dict()), "epoch": 5}, policy_only)
    with pytest.raises(UserError, match="--backbone"):
        load_models(preset, policy_only)
    resnet = tmp_path / "R32_C10.t7"
    torch.save({"state_dict": preset.build_backbone().state_dict()}, resnet)
    backbone, policy, _ = load_models(preset, policy_only, backbone_file=resnet)
    assert policy is not None and backbone.num_blocks == 15


def test_torchvision_resnet101_imports_and_computes_the_same_function(tmp_path):
    tv = randomize_batchnorm(torchvision.models.resnet101(weights=None))
    path = tmp_path / "resnet101.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}, "epoch": 90}, path)
    backbone, policy, ckpt = load_models(get_preset("R101_ImgNet"), path)
    assert ckpt.source == "torchvision" and policy is None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), tv(x), rtol=1e-4, atol=1e-4)


def test_wrong_depth_names_expected_and_found_and_the_preset_that_fits(tmp_path):
    path = tmp_path / "r32.pt"
    torch.save(get_preset("R32_C10").build_backbone().state_dict(), path)
    with pytest.raises(UserError) as err:
        load_models(get_preset("R110_C10"), path)
    msg = str(err.value)
    assert "does not fit preset R110_C10" in msg
    assert "expected basic blocks [18, 18, 18] with 10 outputs" in msg
    assert "found basic blocks [5, 5, 5] with 10 outputs" in msg
    assert "it fits preset R32_C10" in msg


def test_wrong_class_count_is_named(tmp_path):
    path = tmp_path / "c100.t7"
    preset = get_preset("R32_C100")
    torch.save({"agent": original_agent(preset.build_policy().state_dict()),
                "resnet": preset.build_backbone().state_dict()}, path)
    with pytest.raises(UserError, match=r"expected basic blocks \[5, 5, 5\] with 10 outputs, "
                                        r"found basic blocks \[5, 5, 5\] with 100 outputs"):
        load_models(get_preset("R32_C10"), path)


def test_policy_for_another_block_count_is_rejected(tmp_path):
    path = tmp_path / "p.t7"
    torch.save({"agent": original_agent(get_preset("R110_C10").build_policy().state_dict()),
                "resnet": get_preset("R32_C10").build_backbone().state_dict()}, path)
    with pytest.raises(UserError, match="the policy does not fit preset R32_C10.*15 outputs.*54 outputs"):
        load_models(get_preset("R32_C10"), path)


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all\n", "is not a PyTorch checkpoint"),
    ({"weights": [1, 2, 3]}, "is not a BlockDrop or ResNet checkpoint"),
    ({"agent": "oops"}, "entry 'agent' is not a state dict"),
])
def test_files_that_are_not_checkpoints_get_a_clear_error(tmp_path, content, message):
    path = tmp_path / "file.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(UserError, match=message):
        read_checkpoint(path)


def test_pickled_modules_are_refused_without_running_them(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(get_preset("R26_DIGITS").build_backbone(), path)
    with pytest.raises(UserError, match="save a state_dict instead"):
        read_checkpoint(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")

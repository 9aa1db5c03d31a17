"""Channel pruning, the dense competitor: torch-pruning's dependency groups scored, the narrower ResNet
built from the kept channels, its cost, its checkpoint, and the criterion chosen on validation data."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from blockdrop import channels as C
from blockdrop.checkpoints import load_models, save_checkpoint
from blockdrop.flops import cost_model
from blockdrop.models.resnet import full_mids
from blockdrop.presets import get_preset

from test_flops import CallCounter


def randomised(name: str):
    """The preset's ResNet with random BatchNorm statistics and scales, so that wrong channels would show."""
    torch.manual_seed(0)
    backbone = get_preset(name).build_backbone().eval()
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return backbone


@pytest.mark.parametrize("name, size", [("R32_C10", 32), ("R101_ImgNet", 64)])
def test_the_narrower_resnet_is_the_one_torch_prunings_own_group_pruning_makes(name, size):
    """Basic and bottleneck blocks: our state-dict slicing of the kept channels computes exactly what
    torch-pruning's DepGraph pruning of the dropped channels leaves."""
    import torch_pruning as tp

    backbone = randomised(name)
    theirs = copy.deepcopy(backbone)
    graph = tp.DependencyGraph().build_dependency(theirs, example_inputs=torch.zeros(1, 3, size, size), verbose=False)
    theirs.load_state_dict(backbone.state_dict())  # tracing ran in train mode: the statistics back
    kept = C.keep_top(C.scores(backbone, "l1", size), C.widths_at(backbone.spec, 0.4))
    for k in range(theirs.num_blocks):
        for conv, idx in zip(C.inner_layers(theirs, k), kept[k]):
            dropped = [i for i in range(conv.out_channels) if i not in idx]
            graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=dropped).prune()
    ours = C.pruned(backbone, kept, get_preset(name).num_classes).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(theirs.eval()(x), ours(x))
    assert ours.spec.mids == tuple(tuple(len(i) for i in block) for block in kept)


def test_the_kept_channels_are_the_highest_scored_of_each_layer():
    scores = [[torch.tensor([0.5, 3.0, 1.0, 2.0])], [torch.tensor([1.0, 1.0, 0.0])]]
    assert C.keep_top(scores, [(2,), (1,)]) == [[[1, 3]], [[0]]]  # ties: the first


def test_the_pruned_resnet_costs_what_it_runs_and_stays_within_the_target():
    preset = get_preset("R32_C10")
    backbone = preset.build_backbone().eval()
    full = cost_model(preset).full
    for share in (0.8, 0.5, 0.3, 0.12):
        widths = C.widths_within(backbone.spec, 32, 10, share * full)
        model = C.pruned(backbone, C.keep_top(C.scores(backbone, "l2", 32), widths), 10).eval()
        costs = cost_model(preset, None, model)
        counter = CallCounter(model)
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        counter.close()
        assert counter.flops == costs.backbone.total <= share * full
        assert costs.backbone.total > 0.9 * share * full  # the largest share within: not far below the target
        assert costs.full == full  # speedups are against the user's ResNet, before pruning
    assert C.widths_within(backbone.spec, 32, 10, 2 * full) == full_mids(backbone.spec)


def test_a_channel_pruned_checkpoint_loads_as_the_narrower_resnet(tmp_path):
    preset = get_preset("R26_DIGITS")
    backbone = randomised("R26_DIGITS")
    model = C.pruned(backbone, C.keep_top(C.scores(backbone, "bn_scale", 8), C.widths_at(backbone.spec, 0.5)), 10)
    path = tmp_path / "channels.pt"
    save_checkpoint(path, preset, model, None, {"stage": "prune", "config": {"static_policy": [1] * 12}})
    loaded, policy, _ = load_models(preset, path)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert loaded.spec.mids == model.spec.mids and policy.row.tolist() == [1.0] * 12


def test_the_criterion_is_the_one_most_accurate_on_the_validation_images():
    """Labels that one criterion's pruned ResNet predicts: that criterion wins, whatever the order."""
    preset = get_preset("R26_DIGITS")
    backbone = randomised("R26_DIGITS")
    images = torch.randn(64, 1, 8, 8)
    target = get_preset("R26_DIGITS").backbone
    widths = C.widths_within(target, 8, 10, 0.5 * cost_model(preset).full)
    by_fpgm = C.pruned(backbone, C.keep_top(C.scores(backbone, "fpgm", 8), widths), 10).eval()
    with torch.no_grad():
        labels = by_fpgm(images).argmax(1)
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    choice = C.choose(backbone, 0.5 * cost_model(preset).full, 8, 10, loader, torch.device("cpu"))
    assert set(choice.accuracy) == set(C.CHANNEL_CRITERIA) and choice.accuracy["fpgm"] == 1.0
    assert choice.criterion == max(choice.accuracy, key=choice.accuracy.get)
    assert choice.flops <= 0.5 * cost_model(preset).full


def test_a_channel_pruned_model_is_served_at_its_own_cost(tmp_path):
    """The inference path every consumer shares (evaluation, the MLflow model, the server): a channel-pruned
    checkpoint predicts what its network computes, every block run, at the narrower ResNet's FLOPs, with a
    speedup against the unpruned ResNet."""
    from blockdrop import inference

    preset = get_preset("R26_DIGITS")
    backbone = randomised("R26_DIGITS")
    model = C.pruned(backbone, C.keep_top(C.scores(backbone, "l2", 8), C.widths_at(backbone.spec, 0.4)), 10).eval()
    path = tmp_path / "channels.pt"
    save_checkpoint(path, preset, model, None, {"stage": "prune", "config": {"static_policy": [1] * 12}})
    served = inference.load(path)
    images = torch.randn(5, 1, 8, 8)
    out = served.predict(images)
    with torch.no_grad():
        assert torch.equal(out.logits.argmax(1), model(images).argmax(1))
    narrow = cost_model(preset, None, model).backbone.total
    assert out.policies.sum(1).tolist() == [12.0] * 5 and out.flops.tolist() == [float(narrow)] * 5
    assert served.costs.full == cost_model(preset).full > narrow

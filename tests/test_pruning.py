"""Tests for torch_modularity.pruning: masks, schedule, matched random baselines, channel
pruning, the pruned-vs-random comparison and the prune-compare command.

Oracles are independent of the library: counts of exact zeros, sorted magnitudes, the
schedule formula written out step by step, and torch-pruning's own op/parameter counter.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from torch_modularity.pruning import (
    Baseline,
    PolynomialSparsity,
    PruningComparison,
    add_cli,
    compare,
    finalize,
    layer_ratios,
    layer_sparsity,
    load_module,
    magnitude_prune,
    module_from_state_dict,
    random_prune_like,
    run_cli,
    structured_prune,
)


# --------------------------------------------------------------------------- fixtures
def _mlp(sizes=(12, 20, 16, 4), seed=0, scales=None) -> nn.Sequential:
    """Linear chain with ReLUs, weights N(0, 1) x per-layer scale, from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(n_in, n_out)
        scale = 1.0 if scales is None else scales[i]
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n_out, n_in, generator=gen) * scale)
            lin.bias.copy_(torch.randn(n_out, generator=gen))
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _cnn(seed=0) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return net


def _planted(sizes=(32, 48, 48, 8), k=4, seed=0) -> nn.Sequential:
    """Planted modules: weights inside a module ~U(0.5, 1), across modules 10x smaller."""
    gen = torch.Generator().manual_seed(seed)
    modules = [torch.arange(n) % k for n in sizes]
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(n_in, n_out)
        same = modules[i + 1][:, None] == modules[i][None, :]
        mag = 0.5 + 0.5 * torch.rand(n_out, n_in, generator=gen)
        sign = torch.where(torch.rand(n_out, n_in, generator=gen) < 0.5, -1.0, 1.0)
        with torch.no_grad():
            lin.weight.copy_(torch.where(same, mag, 0.1 * mag) * sign)
            lin.bias.zero_()
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _weight_layers(net):
    return [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _zeros(m) -> int:
    return int((m.weight == 0).sum())


# --------------------------------------------------------------------------- magnitude_prune
def test_layer_scope_prunes_each_layer_exactly_and_leaves_biases():
    net = _cnn()
    biases = [m.bias.detach().clone() for m in _weight_layers(net)]
    magnitude_prune(net, 0.7, scope="layer")
    for m, b in zip(_weight_layers(net), biases):
        n = m.weight.numel()
        assert _zeros(m) == int(round(0.7 * n))
        assert torch.equal(m.bias, b)
        # the kept weights of a layer are its largest |w|
        w = m.weight_orig.detach().abs().flatten()
        kept = m.weight_mask.flatten() != 0
        assert w[kept].min() >= w[~kept].max()


def test_global_scope_total_exact_and_keeps_globally_largest():
    net = _mlp(scales=(3.0, 1.0, 0.3))
    originals = torch.cat([m.weight.detach().abs().flatten() for m in _weight_layers(net)])
    magnitude_prune(net, 0.6, scope="global")
    zeros = sum(_zeros(m) for m in _weight_layers(net))
    assert zeros == int(round(0.6 * originals.numel()))
    kept = torch.cat([(m.weight != 0).flatten() for m in _weight_layers(net)])
    threshold = torch.sort(originals, descending=True).values[kept.sum() - 1]
    assert torch.equal(kept, originals >= threshold)
    sparsities = list(layer_sparsity(net).values())
    assert sparsities[0] < 0.6 < sparsities[2]  # global ranking: unequal per-layer sparsity


def test_repeated_pruning_keeps_old_zeros_and_masks_only_grow():
    net = _mlp()
    magnitude_prune(net, 0.5, scope="layer")
    first = [m.weight_mask.clone() for m in _weight_layers(net)]
    orig_params = [m.weight_orig for m in _weight_layers(net)]
    with torch.no_grad():  # "training" moved pruned weights: they must stay pruned
        for m in _weight_layers(net):
            m.weight_orig.add_(100.0 * (m.weight_mask == 0))
    magnitude_prune(net, 0.8, scope="layer")
    for m, mask, param in zip(_weight_layers(net), first, orig_params):
        assert m.weight_orig is param  # same parameter object: an optimizer keeps training it
        assert torch.all(m.weight_mask[mask == 0] == 0)
        assert _zeros(m) == int(round(0.8 * m.weight.numel()))
    magnitude_prune(net, 0.3, scope="layer")  # a lower target does not un-prune
    for m in _weight_layers(net):
        assert _zeros(m) == int(round(0.8 * m.weight.numel()))


def test_include_selects_layers_by_module_or_name():
    net = _mlp()
    magnitude_prune(net, 0.5, include=[net[2], "4"])
    assert _zeros(net[0]) == 0 and not hasattr(net[0], "weight_mask")
    assert _zeros(net[2]) + _zeros(net[4]) == int(round(0.5 * (net[2].weight.numel() + net[4].weight.numel())))
    with pytest.raises(ValueError, match="no module named 'nope'"):
        magnitude_prune(_mlp(), 0.5, include=["nope"])
    with pytest.raises(TypeError, match="ReLU"):
        magnitude_prune(_mlp(), 0.5, include=["1"])


def test_finalize_gives_plain_state_dict_that_loads_into_fresh_model():
    net = magnitude_prune(_mlp(), 0.75)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    expected = net(x)
    sd = finalize(net).state_dict()
    assert not any(k.endswith(("_orig", "_mask")) for k in sd)
    fresh = _mlp(seed=99)
    fresh.load_state_dict(sd)  # strict
    assert torch.allclose(fresh(x), expected)
    zeros = sum(int((v == 0).sum()) for k, v in sd.items() if k.endswith("weight"))
    assert zeros == int(round(0.75 * sum(m.weight.numel() for m in _weight_layers(fresh))))


# --------------------------------------------------------------------------- schedule
def _expected_schedule(t, initial, final, begin, end, freq, power):
    """Written out by walking the steps: the target is recomputed at update steps only."""
    value = 0.0
    for step in range(0, t + 1):
        if begin <= step <= end and ((step - begin) % freq == 0 or step == end):
            value = final + (initial - final) * (1 - (step - begin) / (end - begin)) ** power
    return value


def test_schedule_values_follow_the_formula_with_frequency_and_jump():
    kw = dict(initial=0.5, final=0.9, begin_step=3, end_step=50, frequency=10, power=3)
    sched = PolynomialSparsity(**kw)
    for t in [0, 2, 3, 4, 12, 13, 22, 23, 42, 43, 49, 50, 51, 500]:
        expected = _expected_schedule(t, 0.5, 0.9, 3, 50, 10, 3)
        assert sched.sparsity(t) == pytest.approx(expected, abs=1e-12), t
    assert sched.sparsity(2) == 0.0 and sched.sparsity(3) == pytest.approx(0.5)  # jump at begin_step
    assert sched.sparsity(12) == sched.sparsity(3)  # held between updates
    assert sched.sparsity(50) == pytest.approx(0.9) and sched.sparsity(10**6) == pytest.approx(0.9)
    # the research recipe: s(t) = 0.9 + (0.5 - 0.9)(1 - t/9380)^3 at multiples of 10
    paper = PolynomialSparsity(end_step=9380)
    assert paper.sparsity(4695) == pytest.approx(0.9 - 0.4 * (1 - 4690 / 9380) ** 3)


def test_schedule_step_prunes_model_and_attaches_to_optimizer():
    net = _mlp()
    sched = PolynomialSparsity(net, initial=0.2, final=0.8, end_step=12, frequency=4)
    for t in range(15):
        assert sched.step() == pytest.approx(sched.sparsity(t))
        for m in _weight_layers(net):
            assert _zeros(m) == int(round(sched.sparsity(t) * m.weight.numel()))
    net2 = _mlp(seed=1)
    opt = torch.optim.SGD(net2.parameters(), lr=0.01)
    sched2 = PolynomialSparsity(net2, initial=0.3, final=0.6, end_step=5, frequency=1)
    handle = sched2.attach(opt)
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    for _ in range(7):
        opt.zero_grad()
        net2(x).sum().backward()
        opt.step()
    assert sched2.current_step == 7
    assert list(layer_sparsity(net2).values()) == pytest.approx([0.6, 0.6, 0.6], abs=0.02)
    handle.remove()
    opt.step()
    assert sched2.current_step == 7
    state = sched2.state_dict()
    restored = PolynomialSparsity(end_step=99)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.current_step == 7 and restored.sparsity(3) == sched2.sparsity(3)


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError):
        PolynomialSparsity(initial=0.9, final=0.5, end_step=10)
    with pytest.raises(ValueError):
        PolynomialSparsity(final=1.0, end_step=10)
    with pytest.raises(ValueError):
        PolynomialSparsity(begin_step=10, end_step=10)
    with pytest.raises(ValueError):
        PolynomialSparsity(end_step=10, frequency=0)


# --------------------------------------------------------------------------- random_prune_like
def test_random_prune_like_keeps_exact_per_layer_counts():
    model = _mlp(scales=(3.0, 1.0, 0.3))
    reference = magnitude_prune(copy.deepcopy(model), 0.7, scope="global")
    ref_counts = [int((m.weight != 0).sum()) for m in _weight_layers(reference)]
    assert len(set(c / m.weight.numel() for c, m in zip(ref_counts, _weight_layers(reference)))) > 1
    for values in ("trained", "matched"):
        rand = random_prune_like(model, reference, seed=3, values=values)
        assert [int(m.weight_mask.sum()) for m in _weight_layers(rand)] == ref_counts
        assert [int((m.weight != 0).sum()) for m in _weight_layers(rand)] == ref_counts
        for r, m, ref in zip(_weight_layers(rand), _weight_layers(model), _weight_layers(reference)):
            kept = r.weight_mask != 0
            if values == "trained":
                assert torch.equal(r.weight[kept], m.weight.detach()[kept])
            else:  # the reference's surviving values, at other positions
                assert torch.equal(torch.sort(r.weight[kept].detach()).values,
                                   torch.sort(ref.weight[ref.weight_mask != 0].detach()).values)
            assert torch.equal(r.bias, m.bias)
    assert all(not hasattr(m, "weight_mask") for m in _weight_layers(model))  # model untouched


def test_random_prune_like_seeds_reproduce_and_leave_global_rng_alone():
    model = _mlp()
    reference = magnitude_prune(copy.deepcopy(model), 0.5)
    state = torch.random.get_rng_state()
    a = random_prune_like(model, reference, seed=5)
    b = random_prune_like(model, reference, seed=5)
    c = random_prune_like(model, reference, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    masks = lambda net: [m.weight_mask for m in _weight_layers(net)]
    assert all(torch.equal(x, y) for x, y in zip(masks(a), masks(b)))
    assert not all(torch.equal(x, y) for x, y in zip(masks(a), masks(c)))
    # a plain (finalized) pruned reference gives the same masks as the masked one
    d = random_prune_like(model, finalize(magnitude_prune(copy.deepcopy(model), 0.5)), seed=5)
    assert all(torch.equal(x, y) for x, y in zip(masks(a), masks(d)))


def test_random_prune_like_rejects_mismatched_or_masked_models():
    model = _mlp()
    other = magnitude_prune(_mlp(sizes=(12, 21, 16, 4)), 0.5)
    with pytest.raises(ValueError, match="layer '0'"):
        random_prune_like(model, other)
    with pytest.raises(ValueError, match="3 Linear/Conv2d layers but reference has 2"):
        random_prune_like(model, magnitude_prune(_mlp(sizes=(12, 20, 16)), 0.5))
    pruned = magnitude_prune(copy.deepcopy(model), 0.5)
    with pytest.raises(ValueError, match="already carries a pruning mask"):
        random_prune_like(pruned, pruned)
    with pytest.raises(ValueError, match="values"):
        random_prune_like(model, pruned, values="shuffled")
    plain_pruned = finalize(magnitude_prune(copy.deepcopy(model), 0.5))
    with pytest.warns(UserWarning, match="looks pruned"):  # a pruned net passed as the unpruned one
        random_prune_like(plain_pruned, pruned)


# --------------------------------------------------------------------------- structured
def _widths(net):
    return [tuple(m.weight.shape) for m in _weight_layers(net)]


def test_structured_magnitude_and_random_have_identical_shapes_per_layer():
    model = _mlp(sizes=(20, 30, 36, 5))
    x = torch.randn(2, 20, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    mag = structured_prune(model, x, 0.5)
    rnd = structured_prune(model, x, 0.5, importance="random", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _widths(mag) == _widths(rnd) == [(15, 20), (18, 15), (5, 18)]  # head kept
    assert tp.utils.count_ops_and_params(mag, x) == tp.utils.count_ops_and_params(rnd, x)
    assert _widths(model) == [(30, 20), (36, 30), (5, 36)]  # the original is not modified
    again = structured_prune(model, x, 0.5, importance="random", seed=1)
    assert torch.equal(again[0].weight, rnd[0].weight)  # the seed reproduces the random choice


def test_structured_global_random_reuses_magnitude_ratios():
    gen = torch.Generator().manual_seed(0)
    model = _mlp(sizes=(20, 30, 36, 22, 5), seed=2)
    with torch.no_grad():  # layer-dependent row scales, so that global ranking is non-uniform
        for i, m in enumerate(_weight_layers(model)):
            m.weight.mul_(torch.rand(m.weight.shape[0], 1, generator=gen) ** (i + 1))
    x = torch.randn(2, 20, generator=gen)
    mag = structured_prune(model, x, 0.5, global_pruning=True)
    kept = [w[0] / o[0] for w, o in zip(_widths(mag)[:-1], _widths(model)[:-1])]
    assert max(kept) - min(kept) > 0.1  # the global run did pick different per-layer ratios
    rnd = structured_prune(model, x, 0.5, importance="random", pruning_ratio_dict=layer_ratios(model, mag))
    assert _widths(rnd) == _widths(mag)
    assert tp.utils.count_ops_and_params(rnd, x) == tp.utils.count_ops_and_params(mag, x)


def test_structured_prune_on_model_with_prune_masks():
    model = magnitude_prune(_cnn(), 0.5)
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    small = structured_prune(model, x, 0.5)
    assert _widths(small) == [(2, 1, 3, 3), (5, 32), (3, 5)]
    assert small(x).shape == (2, 3)
    assert hasattr(model[0], "weight_mask")  # the caller's model keeps its masks


# --------------------------------------------------------------------------- compare
def test_compare_planted_modules_pruned_below_random_pruned():
    model = _planted()
    state = torch.random.get_rng_state()
    res = compare(model, sparsity=0.7, n_random=4, n_shuffles=8, n_clusters=4, seed=0, n_workers=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert isinstance(res, PruningComparison)
    trained = res.baselines["random_trained"]
    assert res.pruned.ncut < trained.mean
    assert trained.ncuts.tolist() == [s.ncut for s in res.random_trained]
    # the statistics against the random-pruned nets, recomputed here
    r = np.array([s.ncut for s in res.random_trained])
    assert trained.z == pytest.approx((res.pruned.ncut - r.mean()) / r.std())
    assert trained.p_value == pytest.approx((1 + np.sum(r < res.pruned.ncut)) / (len(r) + 1))
    assert res.baselines["shuffle_layer"].n == res.baselines["shuffle_layer_nonzero"].n == 8
    assert len(res.random_matched) == 4 and res.achieved_sparsity == pytest.approx(0.7, abs=1e-3)
    assert all(s.n_isolated >= 0 and s.n_dead >= s.n_isolated for s in [res.pruned] + res.random_trained)
    assert res.layer_kept == [int((w != 0).sum()) for w in
                              (m.weight for m in _weight_layers(magnitude_prune(copy.deepcopy(model), 0.7)))]
    text = str(res)
    for label in ("random mask, trained values", "random mask, matched values", "shuffle 'layer'",
                  "shuffle 'layer_nonzero'", "holds fixed"):
        assert label in text
    d = res.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["baselines"]["random_trained"]["n"] == 4


def test_compare_finetunes_every_random_copy_identically_with_masks_fixed():
    model = _mlp(sizes=(10, 14, 4))
    pruned = magnitude_prune(copy.deepcopy(model), 0.6)
    seen = []

    def finetune(net):
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        x = torch.randn(8, 10)  # the global RNG: compare seeds it the same way for every copy
        seen.append(x)
        for _ in range(3):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()

    state = torch.random.get_rng_state()
    res = compare(model, pruned_model=pruned, n_random=2, n_shuffles=2, n_clusters=3, n_workers=1, finetune=finetune)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(seen) == 4 and all(torch.equal(seen[0], x) for x in seen)
    assert res.finetuned and res.sparsity is None
    for s in res.random_trained + res.random_matched:
        assert s.n_weights == res.pruned.n_weights  # fine-tuning kept every mask

    def prunes_more(net):
        magnitude_prune(net, 0.9)

    with pytest.raises(ValueError, match="finetune changed the pruning mask"):
        compare(model, pruned_model=pruned, n_random=1, n_shuffles=0, n_clusters=3, n_workers=1, finetune=prunes_more)


def test_compare_reports_a_fully_disconnected_layer():
    model = _mlp(sizes=(16, 24, 24, 4), scales=(1e-3, 1.0, 1.0))
    res = compare(model, sparsity=0.6, n_random=2, n_shuffles=2, n_clusters=3, n_workers=1)
    assert any("'0'" in note and "no weight left" in note for note in res.notes)
    assert res.layer_kept[0] == 0
    assert res.pruned.n_isolated >= 16  # every input unit lost all its edges
    assert res.pruned.n_dead == res.pruned.num_nodes  # no input-to-output path is left
    assert math.isnan(res.pruned.live_ncut) and math.isfinite(res.pruned.ncut)
    assert json.loads(json.dumps(res.to_dict()))["pruned"]["live_ncut"] is None


def test_bad_inputs_raise():
    model = _mlp()
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            magnitude_prune(copy.deepcopy(model), bad)
        with pytest.raises(ValueError, match="sparsity"):
            compare(model, sparsity=bad)
    with pytest.raises(TypeError):
        magnitude_prune(model, True)
    with pytest.raises(ValueError, match="scope"):
        magnitude_prune(model, 0.5, scope="network")
    with pytest.raises(ValueError, match="nothing to prune"):
        magnitude_prune(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), 0.5)
    with pytest.raises(ValueError, match="nothing to prune"):
        random_prune_like(nn.Sequential(nn.ReLU()), nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="ratio"):
        structured_prune(model, torch.zeros(1, 12), 1.0)
    pruned = magnitude_prune(copy.deepcopy(model), 0.5)
    with pytest.raises(ValueError, match="already carries pruning masks"):
        compare(pruned, sparsity=0.5)
    with pytest.raises(ValueError, match="no pruned weights"):
        compare(model, pruned_model=copy.deepcopy(model))
    with pytest.raises(ValueError, match="layer '0'"):
        compare(model, pruned_model=magnitude_prune(_mlp(sizes=(12, 21, 16, 4)), 0.5))


def test_plot_writes_a_file_and_explains_a_missing_matplotlib(tmp_path, monkeypatch):
    res = compare(_mlp(), sparsity=0.5, n_random=2, n_shuffles=2, n_clusters=3, n_workers=1)
    out = res.plot(str(tmp_path / "cmp.png"))
    assert (tmp_path / "cmp.png").stat().st_size > 0 and out.endswith("cmp.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        res.plot(str(tmp_path / "again.png"))


def test_baseline_statistics_edge_cases():
    b = Baseline("x", "x", "x", ncut=1.0, ncuts=[2.0, 2.0], n_isolated=[0, 0])
    assert b.p_value == pytest.approx(1 / 3) and math.isnan(b.z)
    assert Baseline("x", "x", "x", ncut=3.0, ncuts=[1.0, 2.0], n_isolated=[0, 0]).p_value == pytest.approx(1.0)


# --------------------------------------------------------------------------- checkpoints and CLI
def test_module_from_state_dict_rebuilds_the_chain():
    model = _mlp()
    rebuilt = module_from_state_dict(magnitude_prune(copy.deepcopy(model), 0.5).state_dict())
    assert _widths(rebuilt) == _widths(model)
    assert sum(_zeros(m) for m in _weight_layers(rebuilt)) == int(round(0.5 * sum(m.weight.numel() for m in _weight_layers(model))))
    assert torch.equal(rebuilt[2].bias, model[2].bias)
    with pytest.raises(TypeError, match="not a Linear weight"):
        module_from_state_dict(_cnn().state_dict())


def _parse(argv):
    parser = argparse.ArgumentParser(prog="torch-modularity")
    add_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_prune_compare(tmp_path, capsys):
    model = _planted(sizes=(16, 24, 8))
    path = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), path)
    small = ["--random", "2", "--shuffles", "2", "--n-clusters", "3", "--workers", "1"]
    args = _parse(["prune-compare", str(path), "--sparsity", "0.6", "--json"] + small)
    assert args.func is run_cli
    assert run_cli(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sparsity"] == 0.6 and out["baselines"]["random_trained"]["n"] == 2

    pruned_path = tmp_path / "pruned.pt"
    torch.save(finalize(magnitude_prune(copy.deepcopy(model), 0.5)).state_dict(), pruned_path)
    assert run_cli(_parse(["prune-compare", str(path), "--pruned", str(pruned_path)] + small)) == 0
    assert "holds fixed" in capsys.readouterr().out

    whole = tmp_path / "whole.pt"
    torch.save(model, whole)
    assert run_cli(_parse(["prune-compare", str(whole)] + small)) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert run_cli(_parse(["prune-compare", str(whole), "--trust-checkpoint", "--json"] + small)) == 0
    assert isinstance(load_module(str(whole), trust=True), nn.Sequential)

    assert run_cli(_parse(["prune-compare", str(path), "--sparsity", "1.0"] + small)) == 2
    assert "sparsity" in capsys.readouterr().err


def test_compare_on_a_small_cnn_with_batchnorm():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3), nn.ReLU(),
        nn.Conv2d(12, 10, 3), nn.ReLU(), nn.Flatten(), nn.Linear(10 * 4 * 4, 5),
    )
    res = compare(net, sparsity=0.6, n_random=2, n_shuffles=3, n_clusters=3, n_workers=1)
    assert res.pruned.num_nodes == 8 + 12 + 10  # the default CNN graph: conv channels only
    assert res.unpruned.n_dead == 0 and res.pruned.n_dead == 0  # not counted for non-chain graphs
    assert res.layer_names == ["0", "3", "5", "8"]  # every Linear/Conv2d is pruned
    assert abs(res.achieved_sparsity - 0.6) < 0.01
    for b in res.baselines.values():
        assert np.isfinite(b.mean) and b.n > 0
    again = compare(net, sparsity=0.6, n_random=2, n_shuffles=3, n_clusters=3, n_workers=1)
    assert again.pruned.ncut == res.pruned.ncut
    np.testing.assert_array_equal(again.baselines["random_trained"].ncuts, res.baselines["random_trained"].ncuts)
    for r in res.random_trained + res.random_matched:  # random nets keep the pruned net's weight count
        assert r.n_weights == res.pruned.n_weights


def test_schedule_hook_inside_a_compiled_training_step(compiled_training_runs):
    """A pruning schedule attached to an optimizer whose step runs inside ``torch.compile``:
    it prunes eagerly (untraced) and leaves exactly the eager run's masks and weights."""

    def attach(model, opt):
        PolynomialSparsity(model, end_step=6, frequency=2).attach(opt)
        return None, lambda: layer_sparsity(model)

    frames = compiled_training_runs(attach)
    assert frames[True] <= frames[False] + 2, frames

"""Classifier path: metrics on hand-made cases, SalUn's masked training, data, configs, CLI."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from salun_diffusers.classification import cli
from salun_diffusers.classification.data import load_cifar10_data, load_mnist_data, make_forget_split
from salun_diffusers.classification.experiment import ExperimentConfig
from salun_diffusers.classification.methods import MethodConfig, random_wrong_labels, salun_mask, unlearn
from salun_diffusers.classification.metrics import (accuracy, average_gap, evaluate_unlearning,
                                                    fit_confidence_threshold, format_table, mia_efficacy,
                                                    predict_logits, summarize)
from salun_diffusers.classification.models import ResNet18, SmallCNN, build_model


def _have_mnist():
    try:
        load_mnist_data(train_size=100)
        return True
    except FileNotFoundError:
        return False


@pytest.fixture(autouse=True)
def _one_thread():
    """Small convolutions run fastest on one thread, especially on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


needs_mnist = pytest.mark.skipif(not _have_mnist(), reason="MNIST test file not found (../shared/data/mnist)")


class Lookup(nn.Module):
    """Predicts the class stored in the input's only pixel (logit 10 for it, 0 elsewhere)."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return 10.0 * nn.functional.one_hot(x.flatten(1)[:, 0].long(), self.num_classes).float() + self.dummy


def _as_images(classes):
    return torch.tensor(classes, dtype=torch.float32).view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------- metrics


def test_ua_ra_ta_on_known_predictions():
    preds = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    labels = torch.tensor([0, 1, 2, 0, 0, 1, 1, 3, 0, 1])
    forget, retain = torch.arange(4), torch.arange(4, 10)
    test_x, test_y = _as_images([0, 1, 2, 2]), torch.tensor([0, 1, 2, 3])
    m = evaluate_unlearning(Lookup(), _as_images(preds), labels, forget, retain, test_x, test_y)
    assert m["UA"] == pytest.approx(25.0)          # forget: 3 of 4 right
    assert m["RA"] == pytest.approx(500 / 6)       # retain: 5 of 6 right
    assert m["TA"] == pytest.approx(75.0)          # test: 3 of 4 right
    assert 0.0 <= m["MIA"] <= 100.0
    # class-wise: TA counts only test samples of the remaining classes (the wrong one has label 3)
    m = evaluate_unlearning(Lookup(), _as_images(preds), labels, forget, retain, test_x, test_y, forget_class=3)
    assert m["TA"] == pytest.approx(100.0)


def test_accuracy_and_predict_logits():
    logits = predict_logits(Lookup(), _as_images([2, 1, 0]), batch_size=2)
    assert logits.shape == (3, 4)
    assert accuracy(logits, torch.tensor([2, 1, 1])) == pytest.approx(200 / 3)


def _logits(n, margin, label=0, num_classes=10):
    z = torch.zeros(n, num_classes)
    z[:, label] = margin
    return z + 0.01 * torch.randn(n, num_classes, generator=torch.Generator().manual_seed(n))


def test_mia_efficacy_separable_cases():
    members, nonmembers = _logits(200, 20.0), _logits(200, 1.0)  # confident vs unsure on the true label 0
    y = torch.zeros(200, dtype=torch.long)
    # forget samples that look like non-members (unlearned): all predicted non-member
    assert mia_efficacy(members, y, nonmembers, y, _logits(50, 0.5), y[:50]) == pytest.approx(100.0)
    # forget samples that look like members (not unlearned): none predicted non-member
    assert mia_efficacy(members, y, nonmembers, y, _logits(50, 25.0), y[:50]) == pytest.approx(0.0)
    mixed = torch.cat([_logits(30, 25.0), _logits(30, 0.5)])
    assert mia_efficacy(members, y, nonmembers, y, mixed, y[:60]) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="member"):
        mia_efficacy(members[:0], y[:0], nonmembers, y, mixed, y[:60])


def test_confidence_threshold_is_the_best_balanced_cut():
    members, nonmembers = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.25, 0.5, 0.6])
    # cuts after 0.2 and after 0.3 both reach balanced accuracy 5/6; the lower one wins, placed midway
    assert fit_confidence_threshold(members, nonmembers) == pytest.approx(0.225)
    assert fit_confidence_threshold(torch.tensor([0.1, 0.2]), torch.tensor([3.0, 4.0])) == pytest.approx(1.6)


def test_average_gap_summary_and_table():
    ref = {"UA": 10.0, "RA": 100.0, "TA": 90.0, "MIA": 20.0}
    assert average_gap({"UA": 6.0, "RA": 98.0, "TA": 91.0, "MIA": 29.0}, ref) == pytest.approx((4 + 2 + 1 + 9) / 4)
    runs = [{"salun": dict(ref, gap=1.0, rte=2.0)}, {"salun": dict(ref, UA=14.0, gap=3.0, rte=4.0)}]
    s = summarize(runs)
    assert s["salun"]["UA"] == pytest.approx([12.0, 8 ** 0.5])
    assert s["salun"]["gap"] == pytest.approx([2.0, 2 ** 0.5])
    table = format_table(s, "t")
    assert "| salun | 12.00 ± 2.83 | 100.00 ± 0.00 |" in table and "Avg. Gap" in table


# ----------------------------------------------------------------------------------------------- methods


def _toy_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 12, 12, generator=g) + y.view(-1, 1, 1, 1).float()
    return x, y


def test_salun_keeps_weights_outside_mask_bit_identical_with_adamw_weight_decay():
    x, y = _toy_data()
    model = build_model("cnn", 3, 1, 12, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = MethodConfig(epochs=3, lr=1e-2, batch_size=16, optimizer="adamw", weight_decay=0.5, mask_ratio=0.3)
    res = unlearn(model, "salun", (x[:16], y[:16]), (x[16:], y[16:]), cfg, num_classes=3, seed=0)
    after = dict(res.model.named_parameters())
    assert res.info["mask_density"] == pytest.approx(0.3, abs=1e-4)
    changed = 0
    for name, mask in res.mask.items():
        assert torch.equal(after[name].detach()[~mask], before[name][~mask]), name
        changed += int((after[name].detach()[mask] != before[name][mask]).sum())
    assert changed > 0
    for name, p in model.named_parameters():  # the original model is untouched
        assert torch.equal(p.detach(), before[name])
    assert all(p.requires_grad for p in res.model.parameters())


@pytest.mark.parametrize("method", ["retrain", "ft", "rl", "ga", "l1"])
def test_baselines_run_and_move_weights(method):
    x, y = _toy_data()
    model = build_model("cnn", 3, 1, 12, seed=0)
    cfg = MethodConfig(epochs=1, lr=1e-2, batch_size=32)
    res = unlearn(model, method, (x[:16], y[:16]), (x[16:], y[16:]), cfg, num_classes=3,
                  model_fn=lambda: build_model("cnn", 3, 1, 12, seed=1))
    assert res.seconds > 0 and res.model is not model
    assert not torch.equal(res.model.fc2.weight, model.fc2.weight)


def test_salun_mask_leaves_batchnorm_statistics_alone():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 10 * 10, 3))
    x, y = _toy_data(32)
    stats = model[1].running_mean.clone()
    mask = salun_mask(model, x, y, ratio=0.25)
    assert torch.equal(model[1].running_mean, stats)
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(0.25 * total)


def test_random_wrong_labels_are_wrong_and_cover_other_classes():
    y = torch.arange(10).repeat(100)
    wrong = random_wrong_labels(y, 10, torch.Generator().manual_seed(0))
    assert not bool((wrong == y).any())
    assert set(wrong[y == 3].tolist()) == set(range(10)) - {3}


@needs_mnist
def test_salun_lowers_forget_accuracy_on_small_mnist():
    data = load_mnist_data(train_size=1500)
    split = make_forget_split(data.train_y, "class", forget_class=1)
    model = build_model("cnn", 10, 1, 28, seed=0)
    from salun_diffusers.classification.methods import train_classifier

    train_classifier(model, data.train_x, data.train_y, MethodConfig(epochs=4, lr=0.05, schedule="cosine",
                                                                      batch_size=128, augment="none"))
    forget = (data.train_x[split.forget_idx], data.train_y[split.forget_idx])
    retain = (data.train_x[split.retain_idx], data.train_y[split.retain_idx])
    before = accuracy(predict_logits(model, forget[0]), forget[1])
    res = unlearn(model, "salun", forget, retain, MethodConfig(epochs=2, lr=0.01, batch_size=128, augment="none"),
                  num_classes=10)
    after = accuracy(predict_logits(res.model, forget[0]), forget[1])
    retained = accuracy(predict_logits(res.model, retain[0]), retain[1])
    assert before > 90 and after < 20 and retained > 85, (before, after, retained)


# ----------------------------------------------------------------------------------------------- models and data


def test_models():
    r = ResNet18(num_classes=10)
    assert sum(p.numel() for p in r.parameters()) == pytest.approx(11.17e6, rel=0.01)
    assert r(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert SmallCNN()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    a, b = build_model("cnn", 10, 1, 28, seed=3), build_model("cnn", 10, 1, 28, seed=3)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", 10, 3, 32)


def test_forget_splits():
    labels = torch.arange(10).repeat(10)
    s = make_forget_split(labels, "random", forget_ratio=0.1, seed=0)
    assert len(s.forget_idx) == 10 and len(s.retain_idx) == 90
    assert len(set(s.forget_idx.tolist()) | set(s.retain_idx.tolist())) == 100
    assert not torch.equal(s.forget_idx, make_forget_split(labels, "random", forget_ratio=0.1, seed=1).forget_idx)
    c = make_forget_split(labels, "class", forget_class=4)
    assert bool((labels[c.forget_idx] == 4).all()) and not bool((labels[c.retain_idx] == 4).any())


def test_cifar10_from_pickle_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f)
    data = load_cifar10_data(str(tmp_path))
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.train_y.tolist()[:4] == [0, 1, 2, 3] and data.in_channels == 3
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10_data(str(tmp_path / "missing"))


class _Payload:
    """A pickle that creates a file when unpickled (as a crafted data_batch_1 could run any code)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _cifar_folder(tmp_path, protocol=pickle.DEFAULT_PROTOCOL):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": "training batch", "data": rng.integers(0, 255, (4, 3072), dtype=np.uint8),
                         "labels": [0, 1, 2, 3], "filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}, f,
                        protocol=protocol)
    return folder


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_load(tmp_path, protocol):
    _cifar_folder(tmp_path, protocol)
    data = load_cifar10_data(str(tmp_path))
    assert data.train_x.shape == (20, 3, 32, 32) and data.train_y.tolist()[:4] == [0, 1, 2, 3]


@pytest.mark.parametrize("payload", ["open", "os.system", "nested"])
def test_crafted_cifar_batch_runs_no_code(tmp_path, payload):
    folder = _cifar_folder(tmp_path)
    target = tmp_path / "pwned"
    if payload == "open":
        obj = _Payload(str(target))
    elif payload == "os.system":
        obj = type("P", (), {"__reduce__": lambda self: (os.system, (f"touch {target}",))})()
    else:  # hidden inside an otherwise valid batch
        obj = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3], "filenames": [_Payload(str(target))]}
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump(obj, f)
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR-10 python batch .refused to unpickle it"):
        load_cifar10_data(str(tmp_path))
    assert not target.exists()


def test_cifar_batch_of_the_wrong_shape_is_refused(tmp_path):
    folder = _cifar_folder(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, f)
    with pytest.raises(ValueError, match="test_batch is not a CIFAR-10 python batch .it holds no 'data' array"):
        load_cifar10_data(str(tmp_path))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 12]}, f)
    with pytest.raises(ValueError, match="'labels'"):
        load_cifar10_data(str(tmp_path))


# ----------------------------------------------------------------------------------------------- bad inputs, config


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_bad_forget_ratio(ratio):
    with pytest.raises(ValueError, match="forget_ratio"):
        make_forget_split(torch.arange(10), "random", forget_ratio=ratio)
    with pytest.raises(ValueError, match="forget_ratio"):
        ExperimentConfig(forget_ratio=ratio)


def test_bad_inputs_raise_clear_errors():
    x, y = _toy_data(32)
    model = build_model("cnn", 3, 1, 12)
    with pytest.raises(ValueError, match="unknown method 'sparse'"):
        unlearn(model, "sparse", (x, y), (x, y), MethodConfig(), num_classes=3)
    with pytest.raises(ValueError, match="model_fn"):
        unlearn(model, "retrain", (x, y), (x, y), MethodConfig(), num_classes=3)
    with pytest.raises(ValueError, match="unknown method"):
        ExperimentConfig(methods="retrain,salun,foo")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        ExperimentConfig(hparams={"salun": {"mask_ratoi": 0.3}})
    with pytest.raises(ValueError, match="forget_class 12"):
        make_forget_split(torch.arange(10), "class", forget_class=12)
    with pytest.raises(ValueError, match="scenario"):
        ExperimentConfig(scenario="backdoor")
    with pytest.raises(ValueError, match="mask_ratio"):
        MethodConfig(mask_ratio=0.0)


def test_experiment_config_json_round_trip():
    cfg = ExperimentConfig(methods="retrain,salun", seeds="0,1", scenario="class", forget_class=3,
                           hparams={"salun": {"lr": 0.02, "mask_ratio": 0.3}}, train={"epochs": 2})
    assert cfg.hparams["salun"].mask_ratio == 0.3 and cfg.hparams["salun"].epochs == cfg.hparams["ft"].epochs
    back = ExperimentConfig.from_json_string(cfg.to_json_string())
    assert back == cfg and back.seeds == [0, 1] and back.train.epochs == 2


@needs_mnist
def test_cli_end_to_end_and_refuses_to_overwrite(tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["--dataset", "mnist", "--scenario", "random", "--forget_ratio", "0.1", "--methods", "retrain,ft,salun",
            "--seeds", "0", "--train_size", "600", "--train", '{"epochs": 1}',
            "--hparams", json.dumps({m: {"epochs": 1} for m in ("retrain", "ft", "salun")}), "--output_dir", out]
    assert cli.main(argv) == 0
    result = json.load(open(os.path.join(out, "results.json")))
    assert set(result["summary"]) == {"original", "retrain", "ft", "salun"}
    assert result["runs"][0]["forget_size"] == 60
    assert result["summary"]["retrain"]["gap"][0] == 0.0
    assert "| salun |" in open(os.path.join(out, "results.md")).read()
    assert cli.main(argv) == 2 and "--overwrite" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- CLI user mistakes


def _cli_error(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_checks_the_output_folder_before_reading_data_or_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    argv = ["--dataset", "cifar10", "--data_dir", str(tmp_path / "no-data"), "--output_dir", str(blocker / "out")]
    code, err = _cli_error(capsys, argv)
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith("salun-classifier: error: --output_dir") and "cannot be created" in err
    with pytest.raises(ValueError, match="cannot be created"):  # --debug: the exception itself, with its traceback
        cli.main(argv + ["--debug"])


def test_cli_user_mistakes_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "out")
    cases = {
        "CIFAR-10 not found": ["--dataset", "cifar10", "--data_dir", str(tmp_path / "no-data")],
        "not valid JSON": ["--hparams", "{salun: 1}"],
        "unknown method": ["--methods", "retrain,foo"],
        "unknown level": ["--log_level", "chatty"],
    }
    for expected, argv in cases.items():
        code, err = _cli_error(capsys, argv + ["--output_dir", out])
        assert code == 2 and "\n" not in err and "Traceback" not in err, (expected, err)
        assert expected.lower() in err.lower(), (expected, err)
    binary = tmp_path / "hparams.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    code, err = _cli_error(capsys, ["--hparams", str(binary), "--output_dir", out])
    assert code == 2 and "--hparams: not valid JSON" in err
    _cifar_folder(tmp_path / "crafted")
    with open(tmp_path / "crafted" / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump(_Payload(str(tmp_path / "pwned")), f)
    code, err = _cli_error(capsys, ["--dataset", "cifar10", "--data_dir", str(tmp_path / "crafted"), "--output_dir",
                                    out])
    assert code == 2 and "data_batch_3 is not a CIFAR-10 python batch" in err and not (tmp_path / "pwned").exists()

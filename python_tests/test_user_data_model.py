"""Your data, your model: a collaboration of a user's own small CNN on a 100-class, 48x48 image
folder, through the command line and through Python (train, evaluate, resume, compare); fused and
plain ops agreeing on it; a damaged or mismatched checkpoint of a user architecture refused in one
line; and no code named only by a checkpoint ever imported. Also the pieces: the architecture
registry, an image folder's K and normalisation, crop padding, non-square images, old checkpoints.

Everything is made here, tiny: 2 training and 1 test PNG per class, M = 2, one PGD step, 1-2
epochs; the decoded images are cached in this module's temporary folder, not the user's.
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from cda2_ext.cli import main
from cda2_ext.data import (channel_stats, crop_padding, infer_dataset, load_cifar10, load_images)
from cda2_ext.errors import CheckpointError, ConfigError, DataError
from cda2_ext.storage.checkpoint import load_checkpoint
from cda2_ext.models import ARCHITECTURES, Collaboration, named_architectures
from cda2_ext.training import TrainConfig, Trainer, load_collaboration
from helpers import one_line_error, only_error_line, run_cli

K, SIZE = 100, (48, 48)

#: The user's code: a small CNN (images -> 64 features), and another one for the mismatches.
USER_CODE = '''
import torch.nn as nn

def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())

def other_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())
'''


def make_image_folder(root: Path, classes: int, size: Tuple[int, int], n_train: int = 2,
                      n_test: int = 1) -> Path:
    """``root/{train,test}/cNNN/i.png``: one colour per class plus noise (learnable, barely)."""
    rng = np.random.default_rng(0)
    for k in range(classes):
        base = rng.integers(0, 256, 3)
        for split, n in (("train", n_train), ("test", n_test)):
            folder = root / split / f"c{k:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 25, (*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def write_module(folder: Path, code: str = USER_CODE) -> str:
    """A module of ``code`` under a fresh name in ``folder`` (on ``sys.path``); its name."""
    name = f"user_cnn_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(code)
    return name


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The data, the user's module (on ``sys.path``) and the image cache, for this module."""
    root = tmp_path_factory.mktemp("user_data_model")
    code = root / "code"
    code.mkdir()
    module = write_module(code)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CDA2_CACHE", str(root / "cache"))
        mp.syspath_prepend(str(code))
        yield SimpleNamespace(root=root, code=code, data=make_image_folder(root / "hundred", K, SIZE),
                              module=module, arch=f"{module}:small_cnn")
    sys.modules.pop(module, None)


def train_args(ws: SimpleNamespace, out: Path, *extra: str, arch: str = "") -> list:
    """``cda2 train`` of ``arch`` (default: the user's small CNN) on the 100-class folder, tiny."""
    return ["train", "--data", str(ws.data), "--arch", arch or ws.arch, "--num-models", "2",
            "--epochs", "1", "--steps", "1", "--batch-size", "50", "--out-dir", str(out),
            "--no-progress", "--device", "cpu", *extra]


def last_json(text: str) -> dict:
    """The JSON document a command printed last."""
    return json.loads(text[text.index("{"):])


@pytest.fixture(scope="module")
def run(ws: SimpleNamespace) -> Path:
    """A one-epoch CLI run of the user's CNN on the 100-class folder (copy it to change it)."""
    out = ws.root / "run"
    assert main(train_args(ws, out)) == 0
    return out


# ----- through the command line -------------------------------------------------------------------

def test_cli_trains_evaluates_resumes_and_compares(ws, run, tmp_path, capsys):
    capsys.readouterr()
    run2 = tmp_path / "run"
    assert main(train_args(ws, run2)) == 0
    done = last_json(capsys.readouterr().out)
    assert done["data"] == {"dataset": "imagefolder", "name": "hundred", "num_classes": K,
                            "image_size": list(SIZE)}
    _, meta = load_checkpoint(run2)
    model, cfg = meta["model"], meta["config"]
    assert model["arch"] == ws.arch and model["num_classes"] == K and model["image_size"] == list(SIZE)
    assert cfg["dataset"] == "imagefolder" and cfg["num_classes"] == K and cfg["arch"] == ws.arch
    # the normalisation: computed once from the training split, stored in the run and the model
    mean, std = channel_stats(load_images("imagefolder", "train", ws.data).images)
    assert tuple(cfg["mean"]) == tuple(model["mean"]) == mean and tuple(cfg["std"]) == std

    # resume: the constructor named again
    assert main(train_args(ws, run2, "--epochs", "2", "--resume")) == 0
    assert last_json(capsys.readouterr().out)["epochs"] == 2

    assert main(["eval-clean", str(run2), "--arch", ws.arch, "--device", "cpu"]) == 0
    clean = last_json(capsys.readouterr().out)
    assert clean["dataset"] == "imagefolder" and clean["n"] == K and len(clean["submodels"]) == 2
    assert clean["data"]["name"] == "hundred" and clean["data"]["num_classes"] == K
    # every selection rule on it; the table names the data and its K
    assert main(["eval-clean", str(run2), "--arch", ws.arch, "--device", "cpu", "--rules", "all",
                 "--out", str(tmp_path / "rules.json")]) == 0
    assert f"test images of hundred ({K} classes)" in capsys.readouterr().out
    assert json.loads((tmp_path / "rules.json").read_text())["rules"]["n"] == K
    # data of another K than the run's: one line naming it, before any evaluation
    ten = make_image_folder(tmp_path / "ten", 10, SIZE)
    assert main(["eval-clean", str(run2), "--arch", ws.arch, "--device", "cpu",
                 "--data", str(ten)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{K} classes" in err[0] and "10" in err[0], err

    # every attack family on it: PGD, the adaptive attacks, transfer (the run as its own surrogate;
    # a plain CNN has no residual blocks for SGM), Square
    ev = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run2), "--surrogate", str(run), "--arch", ws.arch,
                 "--n-samples", "12", "--eps", "0.03", "--steps", "1", "--restarts", "1",
                 "--apgd-steps", "1", "--queries", "3", "--transfer-steps", "1",
                 "--transfer-methods", "mi-pgd", "m-di2-fgsm", "--temperature-fractions", "1",
                 "--sanity-eps", "0", "--out", str(ev), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"12 test images of hundred ({K} classes)" in out
    report = json.loads((ev / "robustness.json").read_text())
    assert report["config"]["data"]["num_classes"] == K and report["config"]["data"]["name"] == "hundred"
    rows = report["robust_accuracy"]["run"]
    for family in ("PGD-", "adaptive: ", "transfer", "Square-"):
        assert any(r.startswith(family) for r in rows), (family, list(rows))

    assert main(["compare", str(run2), "--eval", str(ev), "--out", str(tmp_path / "cmp")]) == 0
    assert f"data: hundred ({K} classes)" in capsys.readouterr().out


# ----- through Python -----------------------------------------------------------------------------

def test_python_trains_evaluates_and_resumes(ws, tmp_path):
    mod = __import__(ws.module)
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(ws.data), arch=ws.arch, num_models=2,
                      epochs=1, steps=1, batch_size=50, out_dir=str(tmp_path / "r"), progress=False,
                      device="cpu")
    trainer = Trainer(cfg, arch=mod.small_cnn, log=None)
    assert trainer.config.num_classes == K and trainer.crop_pad == 6  # 48 / 8
    trainer.fit()
    model, meta = load_collaboration(tmp_path / "r", arch=mod.small_cnn)
    x = load_images("imagefolder", "test", ws.data).images[:5].float() / 255
    logits, ppd = model(x)
    assert logits.shape == (2, 5, K) and ppd.shape == (2, 5)
    assert model.predict(x).collaboration.shape == (5,)
    # resume to epoch 2, the constructor given again (here by its path)
    again = Trainer(trainer.config.replace(epochs=2), arch=ws.arch, log=None)
    assert len(again.fit(resume=True)) == 2 and again.epoch == 2
    # a collaboration of M copies of any trunk, straight from its constructor
    m = Collaboration(arch=mod.small_cnn, num_models=3, num_classes=K, image_size=SIZE)
    assert m.config.arch == ws.arch and m(x)[0].shape == (3, 5, K)
    with pytest.raises(ConfigError, match="image_size"):
        m(torch.rand(2, 3, 32, 32))


def test_fused_and_plain_ops_agree_on_it(ws, tmp_path):
    mod = __import__(ws.module)
    results = []
    for unfused in (False, True):
        cfg = TrainConfig(dataset="imagefolder", data_dir=str(ws.data), arch=ws.arch, num_models=2,
                          steps=2, batch_size=40, train_limit=80, eval_every=0, progress=False,
                          device="cpu", unfused=unfused, out_dir=str(tmp_path / str(unfused)))
        t = Trainer(cfg, arch=mod.small_cnn, log=None)
        losses = [t.train_step(x, y) for x, y in t.batches()]
        results.append((losses, t.model.state_dict()))
    (fused, s_fused), (plain, s_plain) = results
    for a, b in zip(fused, plain):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for k in s_fused:
        torch.testing.assert_close(s_fused[k], s_plain[k], rtol=1e-4, atol=1e-5)


# ----- refusals -----------------------------------------------------------------------------------

def test_a_damaged_or_mismatched_checkpoint_fails_in_one_line(ws, run, tmp_path, capsys,
                                                               monkeypatch):
    mod = __import__(ws.module)
    with pytest.raises(CheckpointError, match=f"--arch {ws.arch}") as err:
        load_collaboration(run)
    assert "\n" not in str(err.value)
    # another constructor than the recorded one
    with pytest.raises(CheckpointError, match="other_cnn") as err:
        load_collaboration(run, arch=mod.other_cnn)
    assert "\n" not in str(err.value)
    # the recorded name, but its code changed since: the tensors do not fit
    monkeypatch.setattr(mod, "small_cnn", mod.other_cnn)
    with pytest.raises(CheckpointError, match="does not match") as err:
        load_collaboration(run, arch=ws.arch)
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    # a damaged file, from the command line
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in run.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    st = bad / "checkpoint.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    rc, err_text = run_cli(["eval-clean", str(bad), "--arch", ws.arch, "--device", "cpu"], capsys)
    assert rc == 2
    one_line_error(err_text, str(bad))
    # not named, from the command line: each command says how to name it
    assert main(["eval-clean", str(run), "--device", "cpu"]) == 2
    only_error_line(capsys, f"--arch {ws.arch}")
    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "e"), "--device", "cpu"]) == 2
    only_error_line(capsys, f"--arch {ws.arch}")
    assert main(["train", "--out-dir", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 2
    only_error_line(capsys, f"--arch {ws.arch}")


MARKER_CODE = '''
from pathlib import Path
Path({marker!r}).write_text("imported")  # what importing this module does

import torch.nn as nn

def cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())
'''


def test_no_code_named_only_by_a_checkpoint_is_ever_imported(ws, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "imported.txt"
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_module(tmp_path, MARKER_CODE.format(marker=str(marker)))
    arch = f"{name}:cnn"
    out = tmp_path / "run"
    assert main(train_args(ws, out, "--train-limit", "50", "--eval-every", "0", arch=arch)) == 0
    assert marker.is_file()  # named on the command line: imported
    marker.unlink()
    sys.modules.pop(name)
    capsys.readouterr()

    # the run only records the path: nothing that reads it imports it
    with pytest.raises(CheckpointError, match=f"--arch {arch}"):
        load_collaboration(out)
    assert main(["eval-clean", str(out), "--device", "cpu"]) == 2
    assert main(["eval", "--checkpoint", str(out), "--surrogate", str(out), "--out",
                 str(tmp_path / "e"), "--device", "cpu"]) == 2
    assert main(["train", "--out-dir", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 2
    assert main(["compare", str(out), "--out", str(tmp_path / "cmp")]) == 0  # reads configs only
    with named_architectures(ws.arch):  # naming another constructor does not name this one
        with pytest.raises(CheckpointError, match=f"named here: {ws.arch}"):
            load_collaboration(out)
    assert not marker.exists() and name not in sys.modules
    # named again: imported, and it loads
    assert main(["eval-clean", str(out), "--device", "cpu", "--arch", arch]) == 0
    assert marker.is_file()
    sys.modules.pop(name, None)


def test_bad_inputs_name_the_argument(ws, tmp_path, capsys):
    base = dict(dataset="imagefolder", data_dir=str(ws.data), progress=False, device="cpu",
                out_dir=str(tmp_path / "r"), eval_every=0)
    with pytest.raises(ConfigError, match="num_classes: 7"):  # an image folder's K is its own
        Trainer(TrainConfig(num_classes=7, **base), log=None)
    with pytest.raises(ConfigError, match="arch: expected one of"):
        TrainConfig(arch="vit", **base).validate()
    with pytest.raises(ConfigError, match="arch"):  # a lambda has no import path to record
        Collaboration(arch=lambda: torch.nn.Flatten(), num_classes=3, image_size=(8, 8))
    with pytest.raises(ConfigError, match="mean"):
        TrainConfig(mean=(0.5, 0.5), std=(0.2, 0.2), **base).validate()
    with pytest.raises(ConfigError, match="arch: the config's arch is 'resnet'"):
        Trainer(TrainConfig(**base), arch=__import__(ws.module).small_cnn, log=None)
    # the 10-class rule only where CIFAR-10 is named
    with pytest.raises(DataError, match=f"{K} class folders.*--dataset imagefolder"):
        load_cifar10(ws.data, "test")
    assert main(["train", "--data", str(ws.data), "--dataset", "cifar10", "--out-dir",
                 str(tmp_path / "c"), "--no-progress", "--device", "cpu"]) == 2
    only_error_line(capsys, "CIFAR-10 has 10")
    assert main(train_args(ws, tmp_path / "n", arch="nosuch_module_xyz:f")) == 2
    only_error_line(capsys, "arch: cannot import nosuch_module_xyz:f")
    assert not (tmp_path / "n").exists()  # refused before the run folder was made


# ----- the pieces ---------------------------------------------------------------------------------

def test_registry_has_resnet_and_a_widely_used_cifar_model():
    assert {"resnet", "linear", "wrn16-4"} <= set(ARCHITECTURES)
    m = Collaboration(arch="wrn16-4", num_models=2, num_classes=K, depth=20)
    assert m.net.trunk.feature_dim == 256 and m(torch.rand(2, 3, 32, 32))[0].shape == (2, 2, K)
    assert m.net.trunk.members[0].blocks[0].conv1.weight.data_ptr() != \
        m.net.trunk.members[1].blocks[0].conv1.weight.data_ptr()  # two copies, each its own
    with pytest.raises(ConfigError, match="depth"):
        TrainConfig(arch="wrn16-4", depth=8).validate()


def test_which_dataset_a_folder_is_and_its_statistics(tmp_path, ws):
    assert infer_dataset(ws.data) == "imagefolder"
    ten = make_image_folder(tmp_path / "ten", 10, (32, 32), 1, 1)
    assert infer_dataset(ten) == "cifar10"  # as before any K was read: CIFAR-10's rules
    assert infer_dataset(tmp_path / "nowhere") == "cifar10"  # training says what is missing
    images = torch.randint(0, 256, (9, 3, 5, 7), dtype=torch.uint8)
    mean, std = channel_stats(images, chunk=4)
    x = images.double() / 255
    assert mean == tuple(round(v, 6) for v in x.mean((0, 2, 3)).tolist())
    assert std == tuple(round(v, 6) for v in x.std((0, 2, 3), unbiased=False).tolist())
    assert [crop_padding(s, s) for s in (32, 48, 64, 8)] == [4, 6, 8, 1]
    assert crop_padding(24, 40) == 3


def test_non_square_images_train_and_square_attacks_them(tmp_path, ws):
    data = make_image_folder(tmp_path / "tall", 3, (40, 24), 4, 2)
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(data), arch=ws.arch, num_models=2,
                      epochs=1, steps=1, batch_size=6, out_dir=str(tmp_path / "r"), progress=False,
                      device="cpu")
    trainer = Trainer(cfg, arch=ws.arch, log=None)
    trainer.fit()
    assert trainer.image_size == (40, 24) and trainer.model.config.image_size == (40, 24)
    from cda2_ext.attacks.square import square_attack
    w = torch.randn(3, 3 * 40 * 24)

    def model(x):  # always right on its label 0 at first, so every query runs
        return (x.flatten(1) @ w.t() * 1e-3) + torch.tensor([5.0, 0.0, 0.0])
    r = square_attack(model, torch.rand(4, 3, 40, 24), torch.zeros(4, dtype=torch.long), 0.03, 30,
                      generator=torch.Generator().manual_seed(0))
    assert int(r.queries.max()) == 30


def test_a_cifar_style_checkpoint_is_what_earlier_versions_wrote_and_loads(run_copy, capsys):
    """A ResNet run on CIFAR-shaped data writes none of the new fields (earlier versions, which
    refuse unknown keys, read it; and it is what they wrote); without them it loads and resumes."""
    tensors, meta = load_checkpoint(run_copy)
    assert not {"arch", "mean", "std"} & set(meta["config"]) and "image_size" not in meta["model"]
    model, _ = load_collaboration(run_copy)
    assert model.config.arch == "resnet" and model.config.image_size is None
    cfg = TrainConfig.from_meta(meta, run_copy)
    assert cfg.arch == "resnet" and cfg.mean is None
    assert main(["train", "--out-dir", str(run_copy), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert last_json(capsys.readouterr().out)["epochs"] == 2

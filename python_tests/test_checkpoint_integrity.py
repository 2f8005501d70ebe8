"""No byte of a checkpoint unchecked.

* Damaged metadata that still parses - nested thousands deep, ``milestones`` of the wrong type, a
  huge ``num_classes`` or ``depth``, a seed or epoch past any range, no config, a missing or
  random RNG state, a depth its tensors do not have, someone else's safetensors file - is refused
  with one line naming the file, before anything uses it. These checkpoints are re-digested after
  the damage, so the validation alone has to catch them.
* The metadata is covered by ``document_sha256``: an edited learning rate, seed or epoch (not
  re-digested) is refused, as is a checkpoint without the digest unless the user opts in with
  ``CDA2_ALLOW_UNDIGESTED=1`` (then it loads with a one-line warning).
* The tensors are covered by ``tensors_sha256``, which the JSON beside them repeats: one flipped
  bit is reported; and the folder is synced after the save's renames.

And a seeded sample of 500 single-bit flips over the whole file (header and tensors): each load
either gives back exactly the original checkpoint or fails with one :class:`CheckpointError` line.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import stat
import struct
import time
from pathlib import Path

import pytest
import torch

from cda2_ext.storage.checkpoint import (ALLOW_UNDIGESTED_ENV, DIGEST_KEY, DOCUMENT_KEY, FORMAT,
                                 checkpoint_files, document_digest, load_checkpoint,
                                 read_document, save_checkpoint, tensors_digest)
from cda2_ext.cli import main
from cda2_ext.training.restore import load_collaboration
from cda2_ext.errors import CheckpointError
from helpers import (TINY_TRAIN, one_line_error, only_error_line, run_cli, tiny_config,
                     tiny_trainer)


def _write(run: Path, tensors, meta_text: str) -> Path:
    from safetensors.torch import save_file
    st_path = checkpoint_files(run)[0]
    save_file(tensors, str(st_path), metadata={"format": FORMAT, "meta": meta_text})
    return st_path


def _edit(run: Path, change, *, redigest: bool) -> Path:
    """Apply ``change(meta)`` to the run's checkpoint; ``redigest``: recompute its document digest
    (the damage is then "valid" JSON with a matching digest, for the validation to catch)."""
    tensors, meta = load_checkpoint(run)
    change(meta)
    if redigest:
        meta[DOCUMENT_KEY] = document_digest(meta)
    return _write(run, tensors, json.dumps(meta))


def _set(path: str, value):
    """``change`` setting ``meta[a][b] = value`` for ``path`` ``"a.b"`` (and both configs' copy
    of a model field)."""
    def change(meta):
        *outer, key = path.split(".")
        d = meta
        for k in outer:
            d = d[k]
        d[key] = value
        if outer == ["model"] and key in meta["config"]:
            meta["config"][key] = value
    return change


def _flip_tensor_byte(st_path: Path, offset: int = 100) -> None:
    blob = bytearray(st_path.read_bytes())
    header_len = struct.unpack("<Q", blob[:8])[0]
    blob[8 + header_len + offset] ^= 0x01  # one bit of the tensor data, past the header
    st_path.write_bytes(bytes(blob))


# ----- damaged metadata that still parses ----------------------------------------------------------
@pytest.mark.parametrize("raw", ["[" * 100_000 + "]" * 100_000,
                                 '{"epoch": ' + "[" * 50_000 + "]" * 50_000 + "}"],
                         ids=["nested-array", "nested-in-object"])
def test_deeply_nested_metadata_is_one_line(run_copy, capsys, raw):
    tensors, _ = load_checkpoint(run_copy)
    st_path = _write(run_copy, tensors, raw)
    with pytest.raises(CheckpointError, match="damaged metadata"):
        load_checkpoint(run_copy)
    rc, err = run_cli(["eval-clean", str(run_copy), "--device", "cpu"], capsys)
    assert rc == 2
    one_line_error(err, str(st_path), "damaged metadata")


@pytest.mark.parametrize("change, needle", [
    (_set("config.milestones", "abc"), "milestones"),
    (_set("config.milestones", [0.5, "x"]), "milestones"),
    (_set("config.milestones", {"a": 1}), "milestones"),
    (_set("model.num_classes", 2 ** 49), "num_classes"),
    (_set("model.depth", 6 * 10 ** 9 + 2), "depth"),
    (_set("model.num_models", 10 ** 6), "num_models"),
    (_set("config.seed", 2 ** 70), "seed"),
    (_set("config.epochs", 10 ** 30), "epochs"),
    (_set("epoch", 10 ** 30), "epoch"),
    (_set("epoch", 5), "epoch 5"),  # past the config's 1 epoch
    (_set("config.lr", "0.1"), "lr"),
    (_set("config.progress", "yes"), "progress"),
    (_set("history", {"a": 1}), "history"),
], ids=["milestones-str", "milestones-mixed", "milestones-dict", "num-classes-huge", "depth-huge",
        "num-models-huge", "seed-2**70", "epochs-huge", "epoch-huge", "epoch-past-config",
        "lr-str", "flag-str", "history-dict"])
def test_damaged_metadata_is_refused_before_use(run_copy, capsys, change, needle):
    st_path = _edit(run_copy, change, redigest=True)
    t0 = time.perf_counter()
    rc, err = run_cli(["train", *TINY_TRAIN, "--out-dir", str(run_copy), "--resume", "--epochs", "2"],
                   capsys)
    assert rc == 2
    one_line_error(err, str(st_path), needle)
    if needle not in ("epoch 5", "history"):  # what the resumed trainer alone reads
        rc, err = run_cli(["eval-clean", str(run_copy), "--device", "cpu"], capsys)
        assert rc == 2
        one_line_error(err, str(st_path), needle)
    assert time.perf_counter() - t0 < 30  # refused, not attempted (512 TB for num_classes 2**49)


def _rewrite(run: Path, tensors=None, meta=None, header=None) -> Path:
    """Replace the run's checkpoint by one with the given tensors/meta (digest made to match, so
    only the metadata is damaged) or with a raw safetensors ``header``."""
    from safetensors.torch import save_file
    st_path = checkpoint_files(run)[0]
    if header is None:
        if isinstance(meta, dict):
            meta = {**meta, DIGEST_KEY: tensors_digest(tensors)}
            meta[DOCUMENT_KEY] = document_digest(meta)
        header = {"format": FORMAT, "meta": json.dumps(meta)}
    save_file(tensors, str(st_path), metadata=header)
    return st_path


def _damaged(kind: str, run: Path) -> Path:
    tensors, meta = load_checkpoint(run)
    if kind == "no config":
        del meta["config"]
    elif kind == "meta is a list":
        meta = [meta]
    elif kind == "rng missing":
        del tensors["rng.generator"]
    elif kind == "rng random bytes":
        tensors["rng.torch"] = torch.randint(0, 256, (77,), dtype=torch.uint8)
    elif kind == "depth 14 metadata, depth 2 tensors":
        meta["model"]["depth"] = meta["config"]["depth"] = 14
    elif kind == "foreign":
        return _rewrite(run, tensors, header={"name": "someone else's model"})
    return _rewrite(run, tensors, meta)


@pytest.mark.parametrize("kind, needle", [
    ("no config", "no training config"),
    ("meta is a list", "damaged metadata"),
    ("rng missing", "rng.generator: missing"),
    ("rng random bytes", "rng.torch"),
    ("depth 14 metadata, depth 2 tensors", "does not match its model config"),
    ("foreign", "is not a cda2-checkpoint/1 checkpoint"),
])
def test_damaged_checkpoints_are_one_line_naming_the_file(run_copy, capsys, kind, needle):
    st_path = _damaged(kind, run_copy)
    depth = 14 if "depth" in kind else 2  # as the damaged metadata says
    assert main(["train", *TINY_TRAIN, "--depth", str(depth), "--out-dir", str(run_copy), "--resume",
                 "--epochs", "2"]) == 2
    only_error_line(capsys, str(st_path), needle)
    with pytest.raises(CheckpointError):  # and through the library, the same one line
        tiny_trainer(tiny_config(run_copy, depth=depth)).load()


@pytest.mark.parametrize("kind", ["meta is a list", "depth 14 metadata, depth 2 tensors", "foreign"])
def test_eval_clean_names_the_damaged_checkpoint(run_copy, capsys, kind):
    _damaged(kind, run_copy)
    assert main(["eval-clean", str(run_copy), "--device", "cpu"]) == 2
    only_error_line(capsys, str(run_copy))


# ----- the metadata is covered by its digest -------------------------------------------------------
@pytest.mark.parametrize("change", [_set("config.lr", 0.3), _set("config.seed", 1),
                                   _set("epoch", 10 ** 30), _set("history", [])],
                         ids=["lr", "seed", "epoch", "history"])
def test_edited_metadata_is_refused(run_copy, capsys, change):
    st_path = _edit(run_copy, change, redigest=False)
    with pytest.raises(CheckpointError, match=f"metadata does not match the {DOCUMENT_KEY}"):
        load_checkpoint(run_copy)
    rc, err = run_cli(["train", *TINY_TRAIN, "--out-dir", str(run_copy), "--resume", "--epochs", "2"],
                   capsys)
    assert rc == 2
    one_line_error(err, str(st_path), DOCUMENT_KEY)


def test_the_json_file_is_checked_too(run_copy, capsys):
    json_path = checkpoint_files(run_copy)[1]
    doc = json.loads(json_path.read_text())
    assert read_document(run_copy) == doc
    doc["config"]["lr"] = 0.3
    json_path.write_text(json.dumps(doc, indent=2))
    with pytest.raises(CheckpointError, match=f"{json_path}.*{DOCUMENT_KEY}"):
        read_document(run_copy)
    rc, err = run_cli(["compare", str(run_copy), "--out", str(run_copy.parent / "cmp")], capsys)
    assert rc == 2
    one_line_error(err, str(json_path), DOCUMENT_KEY)


def test_the_metadata_digest_is_of_the_values_not_the_layout(run_copy):
    doc = read_document(run_copy)
    shuffled = dict(reversed(list(doc.items())))
    assert document_digest(shuffled) == document_digest(doc) == doc[DOCUMENT_KEY]
    tensors, meta = load_checkpoint(run_copy)
    assert meta[DIGEST_KEY] == tensors_digest(tensors) and meta == doc


def test_a_missing_metadata_digest_is_refused_unless_allowed(run_copy, capsys, monkeypatch):
    st_path = _edit(run_copy, lambda meta: meta.pop(DOCUMENT_KEY), redigest=False)
    monkeypatch.delenv(ALLOW_UNDIGESTED_ENV, raising=False)
    argv = ["eval-clean", str(run_copy), "--device", "cpu", "--limit", "8"]
    rc, err = run_cli(argv, capsys)
    assert rc == 2
    one_line_error(err, str(st_path), f"no {DOCUMENT_KEY}", f"{ALLOW_UNDIGESTED_ENV}=1")
    # opted in: loads, with one warning line (not Python's file:line + source line)
    monkeypatch.setenv(ALLOW_UNDIGESTED_ENV, "1")
    rc, err = run_cli(argv, capsys)
    assert rc == 0
    assert err.strip().splitlines() == [f"cda2: warning: {st_path} has no {DOCUMENT_KEY}; loading "
                                        f"it unverified because {ALLOW_UNDIGESTED_ENV} is set"]
    # the tensors are still checked when their digest is there
    _flip_tensor_byte(st_path)
    with pytest.raises(CheckpointError, match=DIGEST_KEY):
        load_checkpoint(run_copy)


def test_the_opt_in_for_undigested_checkpoints_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert ALLOW_UNDIGESTED_ENV in capsys.readouterr().out


# ----- the tensors are covered by their digest -----------------------------------------------------
def test_the_json_names_the_tensors_it_belongs_to(run_copy):
    st_path, json_path = checkpoint_files(run_copy)
    tensors, meta = load_checkpoint(run_copy)
    doc = json.loads(json_path.read_text())
    assert doc[DIGEST_KEY] == meta[DIGEST_KEY] == tensors_digest(tensors)


def test_one_flipped_bit_in_the_tensors_is_reported(run_copy, capsys):
    st_path = checkpoint_files(run_copy)[0]
    _flip_tensor_byte(st_path)
    with pytest.raises(CheckpointError, match="damaged.*tensors_sha256") as e:
        load_checkpoint(run_copy)
    assert str(st_path) in str(e.value)
    assert main(["eval-clean", str(run_copy), "--device", "cpu"]) == 2
    only_error_line(capsys, str(st_path), "damaged")
    assert main(["train", *TINY_TRAIN, "--out-dir", str(run_copy), "--resume"]) == 2
    only_error_line(capsys, "damaged")


def test_a_checkpoint_without_digests_loads_only_when_allowed(run_copy, monkeypatch):
    # An undigested (old) checkpoint is refused unless the user opts in; then it loads
    # with a warning.
    from safetensors.torch import save_file
    tensors, meta = load_checkpoint(run_copy)
    del meta[DIGEST_KEY], meta[DOCUMENT_KEY]
    st_path = checkpoint_files(run_copy)[0]
    save_file(tensors, str(st_path), metadata={"format": FORMAT, "meta": json.dumps(meta)})
    monkeypatch.delenv(ALLOW_UNDIGESTED_ENV, raising=False)
    with pytest.raises(CheckpointError, match=f"no tensors_sha256.*{ALLOW_UNDIGESTED_ENV}=1"):
        load_collaboration(run_copy)
    monkeypatch.setenv(ALLOW_UNDIGESTED_ENV, "1")
    with pytest.warns(UserWarning, match=f"no {DOCUMENT_KEY}"):
        model, _ = load_collaboration(run_copy)
    assert model.num_models == 2


# ----- saving --------------------------------------------------------------------------------------
def test_the_folder_is_fsynced_after_the_renames(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    save_checkpoint(tmp_path, {"w": torch.ones(2)}, {"epoch": 1})
    assert synced[-1] is True and synced.count(True) >= 2  # after each of the two renames


# ----- every byte: a seeded sample of single-bit flips ---------------------------------------------
def _same(a, b) -> bool:
    """Bit-identical tensors (NaN payloads and -0.0 included)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def test_500_bit_flips_load_identically_or_fail_in_one_line(trained, tmp_path):
    st_src = checkpoint_files(trained)[0]
    blob = st_src.read_bytes()
    tensors, meta = load_checkpoint(trained)
    header_end = 8 + struct.unpack("<Q", blob[:8])[0]
    rng = random.Random(22)
    # half in the length field and JSON header, half in the tensor bytes
    positions = (rng.sample(range(header_end), 250) + rng.sample(range(header_end, len(blob)), 250))
    run = tmp_path / "flipped"
    run.mkdir()
    shutil.copy(checkpoint_files(trained)[1], run)
    target = checkpoint_files(run)[0]
    outcomes = {"identical": 0, "refused": 0}
    for pos in positions:
        damaged = bytearray(blob)
        damaged[pos] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(damaged))
        try:
            got, got_meta = load_checkpoint(run)
        except CheckpointError as err:
            msg = str(err)
            assert "\n" not in msg and str(target) in msg, (pos, msg)
            outcomes["refused"] += 1
            continue
        # accepted: then it is the same checkpoint (a flip the format ignores, e.g. JSON spacing)
        assert got_meta == meta and got.keys() == tensors.keys(), pos
        assert all(_same(got[k], tensors[k]) for k in tensors), pos
        load_collaboration(run)
        outcomes["identical"] += 1
    assert outcomes["refused"] >= 450, outcomes  # nearly every flip matters

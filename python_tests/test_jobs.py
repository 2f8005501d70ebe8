"""Jobs (:mod:`cda2_ext.jobs`): a command as a typed request, checked when built, printed as the
command that runs it by hand, and run in this process exactly as the command runs it."""
from __future__ import annotations

import json

import pytest

from cda2_ext.cli import build_parser, main
from cda2_ext.errors import ConfigError
from cda2_ext.storage.run_folder import METRICS_NAME, training_time
from cda2_ext.jobs import CleanEvalJob, EvalJob, TrainJob, XorJob
from cda2_ext.jobs.base import flag_value
from cda2_ext.training import TrainConfig, Trainer
from cda2_ext.training.methods.base import TrainerView


def _tiny(tmp_path, **more):
    return TrainJob.of(dataset="synthetic", depth=2, num_models=2, phases="standard",
                       batch_size=16, train_limit=32, eval_every=0, progress=False, device="cpu",
                       epochs=1, out_dir=str(tmp_path / "run"), **more)


def test_options_render_in_the_order_given_with_switches_by_their_own_flag(tmp_path):
    job = TrainJob.of(method="ensemble", adv=True, depth=8, lr=0.03, progress=False,
                      random_start=False, augment=False, out_dir=str(tmp_path / "r"))
    assert job.argv() == ["train", "--method", "ensemble", "--adv", "--depth", "8", "--lr", "0.03",
                          "--no-progress", "--no-random-start", "--no-augment", "--out-dir",
                          str(tmp_path / "r")]
    # a switch at its default value says nothing; the other spelling of a pair says the other
    assert TrainJob.of(progress=True).argv() == ["train"]
    assert TrainJob.of(random_start=True).argv() == ["train", "--pgd-random-start"]
    assert job.command.startswith("cda2 train --method ensemble --adv --depth 8")


def test_floats_are_written_as_short_as_they_read_back():
    assert [flag_value(v) for v in (0.03, 1e-4, 2.0, 8 / 255, 3, "x")] == [
        "0.03", "0.0001", "2", repr(8 / 255), "3", "x"]
    assert float(flag_value(8 / 255)) == 8 / 255


def test_unknown_options_and_impossible_values_fail_when_the_job_is_built():
    with pytest.raises(ConfigError, match="cda2 train has no option 'epoch'"):
        TrainJob.of(epoch=3)
    with pytest.raises(ConfigError, match="sigma"):
        TrainJob.of(sigma=-1.0)
    with pytest.raises(ConfigError, match="cda2 eval has no option 'step'"):
        EvalJob.of(checkpoint=["r"], step=3)
    with pytest.raises(ValueError, match="eps"):
        EvalJob.of(checkpoint=["r"], eps=[2.0])
    with pytest.raises(ConfigError, match="cda2 xor has no option"):
        XorJob.of(seeds=3)


def test_with_options_replaces_in_place_and_appends_new_ones(tmp_path):
    job = TrainJob.of(depth=8, epochs=2, out_dir=str(tmp_path / "r"))
    again = job.with_options(epochs=5, resume=True)
    assert again.argv() == ["train", "--depth", "8", "--epochs", "5", "--out-dir",
                            str(tmp_path / "r"), "--resume"]
    assert job.values["epochs"] == 2 and again.resume and not job.resume


@pytest.mark.parametrize("argv", [
    ["train", "--method", "gal", "--adv", "--depth", "8", "--lr", "0.01", "--no-progress",
     "--out-dir", "r"],
    ["eval", "--checkpoint", "a", "b", "--attack", "pgd", "square", "--eps", "0.01", "0.03",
     "--last-iterate", "--no-progress", "--out", "o", "--force"],
    ["eval-clean", "r", "--score", "maxprob", "--limit", "10", "--out", "x.json"],
    ["xor", "--seed", "3", "--figure", "", "--json", "x.json", "--force"],
])
def test_a_parsed_command_and_its_job_agree(argv):
    """The CLI is an adapter: the job of a parsed command line prints a command that parses to the
    same options, and the job's config is what the command would run."""
    job_type = {"train": TrainJob, "eval": EvalJob, "eval-clean": CleanEvalJob, "xor": XorJob}[argv[0]]
    job = job_type.from_args(build_parser().parse_args(argv))
    again = job_type.from_args(build_parser().parse_args(job.argv()))
    assert again.namespace() == job.namespace()
    if job_type is TrainJob:
        assert job.config() == TrainConfig.for_method(
            method="gal", adv=True, depth=8, lr=0.01, progress=False, out_dir="r").validate()
    if job_type is EvalJob:
        cfg = job.config()
        assert cfg.attacks == ("pgd", "square") and cfg.eps == (0.01, 0.03)
        assert cfg.pgd.last_iterate and not cfg.progress


@pytest.mark.slow
def test_a_job_run_in_process_is_the_command(tmp_path, capsys):
    job = _tiny(tmp_path)
    assert job.run() == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epochs"] == 1 and printed["out_dir"] == str(tmp_path / "run")
    assert (tmp_path / "run" / METRICS_NAME).is_file()
    assert len(training_time(tmp_path / "run").epoch_seconds) == 1
    # the printed command continues the same run by hand
    assert main(job.with_options(epochs=2, resume=True).argv()) == 0
    assert len(training_time(tmp_path / "run").epoch_seconds) == 2
    # and resuming with a change of trajectory is refused, naming the option
    with pytest.raises(Exception, match="lr"):
        job.with_options(epochs=3, lr=0.5, resume=True).config()


def test_the_trainer_offers_every_member_the_methods_use(tmp_path):
    cfg = TrainConfig(dataset="synthetic", depth=2, num_models=2, batch_size=8, train_limit=8,
                      test_limit=8, progress=False, device="cpu", out_dir=str(tmp_path / "r"))
    trainer = Trainer(cfg)
    members = [m for m in vars(TrainerView) if not m.startswith("_")]
    members += list(TrainerView.__annotations__)
    assert {"config", "model", "update", "random_start", "autocast", "log"} <= set(members)
    for name in members:
        assert hasattr(trainer, name), name

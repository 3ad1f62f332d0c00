"""The examples' shared flags (`examples.cli`): definitions and checks."""

from absl import app
from absl import flags
import pytest

from examples import cli


def _flags(argv=(), **defaults):
    values = flags.FlagValues()
    cli.define_flags(flag_values=values, **defaults)
    values(["prog", *argv])
    return values


def test_two_schedules_define_their_own_flags():
    scratch = _flags(out_dir="out/a", bits=2, batch_size=32, float_epochs=30,
                     lutq_epochs=15, lutq_options=False)
    assert (scratch.out_dir, scratch.bits, scratch.batch_size) == (
        "out/a", 2, 32)
    assert (scratch.float_epochs, scratch.lutq_epochs) == (30, 15)
    assert (scratch.learning_rate, scratch.lutq_learning_rate) == (1e-3, 5e-4)
    for absent in ("epochs", "constraint", "prune_rate", "data_dir", "limit"):
        assert absent not in scratch
    assert cli.lutq_options(scratch) == dict(
        bits=2, constraint="none", prune_rate=0.0, per_channel=False)

    pretrained = _flags(
        ["--constraint=pow2", "--prune_rate=0.5", "--per_channel",
         "--data_dir=x.tgz"],
        out_dir="out/b", bits=4, batch_size=64, epochs=1, learning_rate=3e-4,
        data_help="data")
    assert (pretrained.epochs, pretrained.learning_rate) == (1, 3e-4)
    assert "float_epochs" not in pretrained
    assert "lutq_learning_rate" not in pretrained
    assert (pretrained.data_dir, pretrained.limit) == ("x.tgz", None)
    assert cli.lutq_options(pretrained) == dict(
        bits=4, constraint="pow2", prune_rate=0.5, per_channel=True)
    with pytest.raises(flags.IllegalFlagValueError):
        _flags(["--constraint=cubic"], out_dir="o", bits=4, batch_size=1,
               epochs=1)


def test_define_flags_needs_exactly_one_schedule():
    for schedule in ({}, {"float_epochs": 1}, {"epochs": 1, "float_epochs": 1,
                                                "lutq_epochs": 1}):
        with pytest.raises(ValueError, match="either epochs"):
            cli.define_flags("o", 2, 32, flag_values=flags.FlagValues(),
                             **schedule)


@pytest.mark.parametrize("argv, message", [
    (["--bits=0"], "--bits must be in 1..7"),
    (["--bits=8"], "--bits must be in 1..7"),
    (["--prune_rate=1.0"], "--prune_rate must be in [0, 1), got 1.0."),
    (["--prune_rate=-0.1"], "--prune_rate must be in [0, 1)"),
    (["--float_epochs=-1"], "--float_epochs must be >= 0, got -1."),
    (["--lutq_epochs=-2"], "--lutq_epochs must be >= 0, got -2."),
    (["--batch_size=0"], "--batch_size must be >= 1, got 0."),
    (["--limit=0"], "--limit must be >= 1, got 0."),
])
def test_check_flags_names_the_bad_flag(argv, message):
    values = _flags(argv, out_dir="o", bits=2, batch_size=32, float_epochs=1,
                    lutq_epochs=0, data_help="data")
    with pytest.raises(app.UsageError) as error:
        cli.check_flags(values)
    assert message in str(error.value)


def test_check_flags_accepts_the_edges():
    values = _flags(["--bits=7", "--prune_rate=0.0", "--limit=1",
                     "--epochs=0", "--batch_size=1"],
                    out_dir="o", bits=1, batch_size=32, epochs=1,
                    data_help="data")
    cli.check_flags(values)  # no error
    values = _flags(["--epochs=-1"], out_dir="o", bits=1, batch_size=32,
                    epochs=1)
    with pytest.raises(app.UsageError, match="--epochs must be >= 0"):
        cli.check_flags(values)

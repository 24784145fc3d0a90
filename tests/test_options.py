"""Every numeric option of every script is checked when the command line is parsed: the test walks each
parser's options, finds the numeric ones from their types, gives each a value outside what it takes, and
expects one `error:` line that names the option and exit status 2 (argparse's usage block is not printed).
An option declared with a bare `type=int` or `type=float` (unchecked) fails the walk."""
import argparse
import math

import pytest

import benchmark
import cli
import generate
import invert
import prepare
import train_encoder
import train_gan

# Each parser, with the arguments it needs before any option can be tried (its required ones).
PARSERS = {
    "train_gan.py": (train_gan.build_parser, []),
    "train_encoder.py": (train_encoder.build_parser, []),
    "invert.py": (invert.build_parser, ["img.png"]),
    "generate.py": (generate.build_parser, ["--ckpt", "x.pt"]),
    "benchmark.py": (benchmark.build_parser, []),
    "prepare.py jsrt": (prepare.build_parser, ["jsrt", "src", "out"]),
    "prepare.py check": (prepare.build_parser, ["check"]),
    "prepare.py show": (prepare.build_parser, ["show"]),
    "prepare.py demo": (prepare.build_parser, ["demo", "out"]),
    "prepare.py split": (prepare.build_parser, ["split", "--data", "d", "--out", "o"]),
}


def actions(script):
    """The options of `script`'s parser (of its sub-command for prepare.py)."""
    build, prefix = PARSERS[script]
    parser = build()
    if script.startswith("prepare.py"):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[prefix[0]]
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def bad_values(action):
    """Values outside what `action` takes, from what its type says it takes (nothing for non-numeric ones)."""
    kind = action.type
    if action.choices is not None and kind in (int, float):
        return ["48" if 48 not in action.choices else "-7"]
    if kind in (int, float):
        raise AssertionError(f"{action.option_strings[0]}: an unchecked numeric option (type={kind.__name__}); "
                             "use cli.number() or one of cli.POSITIVE_INT, COUNT, POSITIVE, NON_NEGATIVE, FRACTION")
    if hasattr(kind, "item"):  # cli.number_list
        return ["0" if kind.count is None else "1", "x,1"] + (["0,1,1,1"] if kind.count else [])
    if hasattr(kind, "choices"):  # cli.choice_list
        return ["nothing", ""]
    if not hasattr(kind, "low"):
        return []
    values = ["nan", "x"]
    step = 1 if getattr(kind, "kind", int) is int else 0.5
    if kind.low is not None:
        values.append(str(kind.low - step))
    if getattr(kind, "above", None) is not None:
        values.append(str(kind.above))
    if getattr(kind, "high", None) is not None:
        values.append(str(kind.high + step))
    return values


def parse(script, argv):
    build, prefix = PARSERS[script]
    return build().parse_args(prefix + argv)


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_numeric_option_refuses_a_bad_value_in_one_line(script, capsys):
    walked = 0
    for action in actions(script):
        for value in bad_values(action):
            option = action.option_strings[-1]
            with pytest.raises(SystemExit) as stop:
                parse(script, [f"{option}={value}"])
            err = capsys.readouterr().err.strip().splitlines()
            assert stop.value.code == 2, (script, option, value)
            assert len(err) == 1 and err[0].startswith("error: argument ") and option in err[0], (script, option, err)
            assert "give" in err[0] or "choose from" in err[0], err  # and it says what the option takes
            walked += 1
    assert walked >= {"train_gan.py": 40, "train_encoder.py": 40, "invert.py": 15, "benchmark.py": 2}.get(script, 3), walked


@pytest.mark.parametrize("script,argv", [
    ("train_gan.py", ["--resolution", "48"]), ("train_gan.py", ["--batch", "0"]), ("train_gan.py", ["--batch", "-2"]),
    ("train_gan.py", ["--lr", "-1"]), ("train_gan.py", ["--workers", "-1"]), ("train_gan.py", ["--style-dim", "0"]),
    ("train_encoder.py", ["--batch", "0"]), ("train_encoder.py", ["--lr", "-1"]),
    ("train_encoder.py", ["--encoder-units", "0,0"]), ("invert.py", ["--lr", "-1"]), ("invert.py", ["--batch", "0"]),
    ("invert.py", ["--batch", "-1"]),
])
def test_the_values_a_new_user_tried_end_in_one_line(script, argv, capsys):
    """The values of the report that ended in a traceback, a hang or a silent success."""
    with pytest.raises(SystemExit) as stop:
        parse(script, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and argv[0] in err[0], err


def test_good_values_pass_and_keep_their_meaning():
    args = parse("train_gan.py", ["--batch", "4", "--lr", "0.01", "--mixing", "0", "--r1", "0", "--resolution", "64",
                                  "--num-labels", "0", "--snap-every", "7"])
    assert (args.batch, args.lr, args.mixing, args.r1, args.resolution, args.num_labels, args.snap_every) == \
        (4, 0.01, 0.0, 0.0, 64, 0, 7)
    assert parse("train_encoder.py", ["--encoder-units", "1,2,3,4"]).encoder_units == (1, 2, 3, 4)
    assert parse("train_encoder.py", []).encoder_units == (3, 4, 14, 3)
    assert parse("invert.py", []).batch is None and parse("invert.py", ["--steps", "0"]).steps == 0
    assert parse("prepare.py demo", ["--resolution", "20"]).resolution == 20  # any size for the data tools


def test_number_by_hand():
    positive = cli.number(float, above=0)
    assert positive("1e-3") == 1e-3
    for bad in ("0", "-1", "inf", "nan", "one"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive(bad)
    fraction = cli.number(float, low=0, high=1)
    assert fraction("0") == 0 and fraction("1") == 1
    with pytest.raises(argparse.ArgumentTypeError, match="from 0 to 1"):
        fraction("1.5")
    count = cli.number(int, low=0)
    assert count("0") == 0 and not math.isnan(count("7"))
    with pytest.raises(argparse.ArgumentTypeError, match="whole number of 0 or more"):
        count("2.5")

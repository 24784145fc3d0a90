"""The command lines' shared parts: a parser whose errors are one line, and numeric option types checked
when the command line is parsed, so that a bad value (a negative batch, a zero learning rate, nan) is one
`error:` line naming the option and what it takes, never a traceback half way through a run. Every script
of the project builds its options from these; test_options.py walks them all. Needs: nothing of the project.
"""

import argparse
import math


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad option reported in one line (argparse's own prints its whole usage first):
    `error: argument --batch: 0: give a whole number of 1 or more (see train_gan.py --help)`, exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def number(kind, low=None, high=None, above=None):
    """An argparse type: a `kind` (int or float) of at least `low` (or more than `above`) and at most `high`."""
    noun = "a whole number" if kind is int else "a number"
    if low is not None and high is not None:
        takes = f"{noun} from {low:g} to {high:g}"
    elif low is not None:
        takes = f"{noun} of {low:g} or more"
    elif above is not None:
        takes = f"{noun} above {above:g}"
    else:
        takes = noun

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give {takes}") from None
        if not math.isfinite(value) or (low is not None and value < low) or (above is not None and value <= above) \
                or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text}: give {takes}")
        return value

    parse.__name__ = takes  # what argparse would name in its own messages
    parse.kind, parse.low, parse.high, parse.above = kind, low, high, above  # for the tests that walk the options
    return parse


def number_list(kind, low=None, count=None):
    """An argparse type for comma-separated numbers (--encoder-units 3,4,14,3), each checked as number()
    checks one, `count` of them if given."""
    one = number(kind, low=low)
    takes = f"{count or 'one or more'} comma-separated values, each {one.__name__}"

    def parse(text):
        try:
            values = tuple(one(v) for v in text.split(","))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{text}: give {takes}") from None
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"{text}: give {takes}")
        return values

    parse.__name__ = takes
    parse.item, parse.count = one, count
    return parse


def choice_list(choices):
    """An argparse type for a comma-separated subset of `choices` (benchmark.py --only ops,stage1)."""
    def parse(text):
        values = text.split(",")
        if any(v not in choices for v in values):
            raise argparse.ArgumentTypeError(f"{text}: give one or more of {', '.join(choices)}, comma-separated")
        return values

    parse.__name__ = f"a list of {', '.join(choices)}"
    parse.choices = tuple(choices)
    return parse


POSITIVE_INT = number(int, low=1)         # steps, batches, sizes, intervals
COUNT = number(int, low=0)                # counts where 0 means none, seeds, workers
POSITIVE = number(float, above=0)         # learning rates, temperatures, clip norms
NON_NEGATIVE = number(float, low=0)       # loss weights (0 turns a term off), gammas, seconds
FRACTION = number(float, low=0, high=1)   # probabilities, decays, fractions

"""Tests of longnet.cli: the argparse types shared by examples/ and benchmarks/."""

import argparse

import pytest

from longnet.cli import choice_list, int_list


def test_int_list():
    assert int_list("512, 1024,2048") == [512, 1024, 2048]
    assert int_list("4,") == [4] and int_list("") == []
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers"):
        int_list("4,x")


def test_choice_list():
    parse = choice_list(("a", "b", "c"))
    assert parse("c, a") == ["c", "a"] and parse("b,") == ["b"]
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown \['d'\]"):
        parse("a,d")


def test_choice_list_is_a_usage_error(capsys):
    p = argparse.ArgumentParser()
    p.add_argument("--variants", type=choice_list(("x", "y")), default="x,y")
    assert p.parse_args([]).variants == ["x", "y"]
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--variants", "x,z"])
    assert exc.value.code == 2
    assert "argument --variants: unknown ['z']" in capsys.readouterr().err

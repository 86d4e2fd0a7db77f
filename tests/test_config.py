"""The config dataclasses document themselves: every field has a help line, and a field with a
fixed set of values rejects others (naming them) when a config is built in code."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from meta_mask import config as config_lib


def _config_classes(cls, seen=None) -> list[type]:
    """`cls` and every config dataclass nested in it."""
    seen = [] if seen is None else seen
    if cls not in seen:
        seen.append(cls)
        for kind in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(kind):
                _config_classes(kind, seen)
    return seen


CLASSES = _config_classes(config_lib.Config) + [config_lib.SweepConfig]
CHOICE_FIELDS = [
    (cls, f)
    for cls in CLASSES
    for f in dataclasses.fields(cls)
    if f.metadata.get("choices") is not None
]


def test_every_leaf_field_has_a_help_line():
    for cls in CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            help_ = f.metadata.get("help", "")
            assert len(help_.split()) >= 3 and "\n" not in help_, (cls.__name__, f.name, help_)


def test_the_string_fields_with_fixed_values_declare_them():
    declared = {(cls.__name__, f.name) for cls, f in CHOICE_FIELDS}
    expected = {
        ("ModelConfig", "activation_function"),
        ("ModelConfig", "dtype"),
        ("OptimConfig", "schedule"),
        ("PolicyConfig", "name"),
        ("PolicyConfig", "output_format"),
        ("PolicyConfig", "span_distribution"),
        ("PolicyConfig", "span_over"),
        ("PolicyConfig", "infill"),
        ("MetaConfig", "estimator"),
        ("MetaConfig", "inner_optimizer"),
        ("MetaConfig", "policy_units"),
        ("SupervisedConfig", "objective"),
        ("SupervisedConfig", "units"),
        ("Config", "stages"),
        ("SweepConfig", "policies"),
        ("SweepConfig", "reference"),
    }
    assert expected <= declared


@pytest.mark.parametrize(
    ("cls", "f"), CHOICE_FIELDS, ids=[f"{c.__name__}.{f.name}" for c, f in CHOICE_FIELDS]
)
def test_a_value_outside_the_choices_is_refused_in_code(cls, f):
    valid = f.metadata["choices"]
    bad = "bogus" if isinstance(valid[0], str) else 7
    value = (bad,) if isinstance(f.default, tuple) else bad
    with pytest.raises(ValueError, match=f"{cls.__name__}.{f.name}=") as err:
        cls(**{f.name: value})
    assert all(str(v) in str(err.value) for v in valid)
    cls(**{f.name: (valid[-1],) if isinstance(f.default, tuple) else valid[-1]})  # accepted


def test_option_carries_help_and_choices():
    @dataclasses.dataclass(frozen=True)
    class Example:
        size: int = config_lib.option(3, "How many things there are.")
        kind: str = config_lib.option("a", "Which kind.", choices=("a", "b"))

        def __post_init__(self):
            config_lib.check_choices(self)

    size, kind = dataclasses.fields(Example)
    assert size.metadata["help"] == "How many things there are." and "choices" not in size.metadata
    assert kind.metadata["choices"] == ("a", "b")
    assert Example() == Example(size=3, kind="a")
    with pytest.raises(ValueError, match="Example.kind='c'.*valid: a, b"):
        Example(kind="c")


def test_sweep_is_not_part_of_a_runs_config():
    assert "sweep" not in {f.name for f in dataclasses.fields(config_lib.Config)}
    assert config_lib.SweepConfig().is_single()
    assert not config_lib.SweepConfig(seeds=(1,)).is_single()
    assert config_lib.SweepConfig().reference == "salient_spans"


def test_mixed_training_options_name_their_field_and_need_a_generic_population():
    from meta_mask.config import Config, GenericConfig, WorldConfig

    for name in ("qa_every", "intermediate_qa_every", "intermediate_replay_every"):
        for bad in (-1, 1):
            with pytest.raises(ValueError, match=f"GenericConfig.{name}={bad}"):
                GenericConfig(**{name: bad})
        with pytest.raises(ValueError, match="generic population's questions"):
            Config(generic=GenericConfig(**{name: 4}), world=WorldConfig(generic_people=0))

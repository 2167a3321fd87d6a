"""The CLI tells users that a flag their method does not read is ignored (`unread_flags`); these
tests hold every matrix-level method to that: such a setting neither fails nor changes the result."""

import json
from dataclasses import fields, replace

import pytest
import torch

from unibcq.cli import SETTING_FLAGS, flag_methods
from unibcq.config import QuantConfig, normalized_record
from unibcq.methods.registry import HESSIAN_METHODS, METHODS as ALL_METHODS, PER_MATRIX_METHODS, SETTING_READERS

# flag -> (QuantConfig field, a value other than the default)
FLAG_FIELDS = {
    "--symmetric": ("symmetric", True), "--float-zero": ("integer_zero", False), "--clip-search": ("clip_search", True),
    "--no-offset": ("offset", False), "--iters": ("iters", 3), "--init": ("init", "greedy"),
    "--algorithm": ("algorithm", "greedy"), "--max-groups": ("max_groups", 1), "--lambda": ("lam", 0.1),
    "--raw-lambda": ("normalize_lambda", False), "--window": ("window", 8), "--granularity": ("granularity", "row"),
    "--dp-atom-size": ("dp_atom_size", 2), "--refine-sweeps": ("refine_sweeps", 1),
    "--merge-rule": ("merge_rule", "paper"), "--damp": ("damp", 0.1), "--group-size": ("group_size", 64),
}
METHODS = [*PER_MATRIX_METHODS, *HESSIAN_METHODS]
ONLY_WITH = {"--dp-atom-size": {"algorithm": "dp"}}  # settings that matter only beside another one


def _quantize(method: str, config: QuantConfig, weight: torch.Tensor, hessian: torch.Tensor) -> dict:
    if method in HESSIAN_METHODS:
        packed = HESSIAN_METHODS[method](weight, hessian, config)
    else:
        packed = PER_MATRIX_METHODS[method](weight, config)
    return packed.tensors()


def test_every_flag_in_the_table_is_known_here():
    assert set(FLAG_FIELDS) <= set(flag_methods())


@pytest.mark.parametrize("method", METHODS)
def test_a_flag_the_method_does_not_read_changes_nothing(method):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 64, generator=gen)
    x = torch.randn(256, 64, generator=gen)
    hessian = x.T @ x / len(x)
    base = QuantConfig(method, bits=1 if method == "dyngroup" else 2, group_size=-1 if method == "dyngroup" else 32)
    expected = _quantize(method, base.validate(), weight, hessian)
    readers = flag_methods()
    unread = [flag for flag in FLAG_FIELDS if method not in readers[flag]]
    assert unread
    for flag in unread:
        name, value = FLAG_FIELDS[flag]
        got = _quantize(method, replace(base, **{name: value}).validate(), weight, hessian)
        assert got.keys() == expected.keys(), flag
        assert all(torch.equal(got[k], expected[k]) for k in got), f"{method} changed with {flag}"


@pytest.mark.parametrize("method", METHODS)
def test_a_setting_the_method_reads_changes_its_result(method):
    """The other direction: a setting its record keeps is one that matters (a method left out of a
    setting's readers would have its checkpoints silently drop a setting that shaped them)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 64, generator=gen)
    weight[0, :4] *= 8  # outliers, so that clipping has something to clip
    x = torch.randn(256, 64, generator=gen) * torch.linspace(0.1, 3, 64)
    hessian = x.T @ x / len(x)
    base = QuantConfig(method, bits=2, group_size=32)
    if method == "dyngroup":  # windows of 16 of the 512 magnitudes: room for up to 32 groups
        base = QuantConfig(method, bits=1, group_size=-1, window=16)
    read = [flag for flag, (name, _) in FLAG_FIELDS.items() if name in SETTING_READERS and method in flag_methods()[flag]]
    assert read
    for flag in read:
        name, value = FLAG_FIELDS[flag]
        context = replace(base, **ONLY_WITH.get(flag, {}))
        expected = _quantize(method, context.validate(), weight, hessian)
        got = _quantize(method, replace(context, **{name: value}).validate(), weight, hessian)
        assert got.keys() != expected.keys() or any(not torch.equal(got[k], expected[k]) for k in got), \
            f"{method} did not change with {flag}"


def test_from_preset_gives_the_preset_and_lets_fields_override():
    from unibcq.methods.presets import PRESETS

    paper = QuantConfig.from_preset("uniquanf", "paper", bits=2)
    stored = {"seq_len": "calib_seq_len"}
    assert all(getattr(paper, stored.get(k, k)) == v for k, v in PRESETS["paper"].items())
    assert paper.bits == 2 and paper.calib == "wikitext2"
    fast = QuantConfig.from_preset("flexround", epochs=1, calib_seq_len=64)
    assert (fast.epochs, fast.calib_seq_len, fast.calib_samples) == (1, 64, PRESETS["fast"]["calib_samples"])
    alternating = QuantConfig.from_preset("bcq-alternating", "paper")  # calibration-free: its own T, no calibration
    assert (alternating.iters, alternating.calib) == (15, None)



def test_every_setting_names_its_readers():
    """A setting added to QuantConfig without readers would be recorded for every method."""
    common = {"method", "bits", "group_size", "include_lm_head", "overrides", "version"}
    names = {f.name for f in fields(QuantConfig)}
    assert set(SETTING_READERS) == names - common
    assert all(readers and set(readers) <= set(ALL_METHODS) for readers in SETTING_READERS.values())
    assert set(SETTING_FLAGS.values()) <= set(SETTING_READERS)
    assert all(SETTING_FLAGS.get(flag, field) == field for flag, (field, _) in FLAG_FIELDS.items())


def test_the_record_lists_only_what_the_method_reads():
    rtn = QuantConfig("rtn", bits=2).recorded()
    assert {"method", "bits", "group_size", "symmetric", "clip_search", "integer_zero"} <= rtn.keys()
    assert not {"epochs", "iters", "offset", "lam", "damp", "calib", "seed"} & rtn.keys()
    uniquanf = QuantConfig.from_preset("uniquanf").recorded()
    assert {"b_lr", "remap_every", "iters", "epochs", "calib", "seed"} <= uniquanf.keys()
    assert not {"offset", "symmetric", "damp", "lam"} & uniquanf.keys()
    assert "damp" in QuantConfig("gptq-bcq").recorded() and "symmetric" not in QuantConfig("gptq-bcq").recorded()


def test_a_record_that_lists_unread_settings_compares_equal_to_one_that_does_not():
    config = QuantConfig("bcq-alternating", bits=2)
    full = json.loads(json.dumps(config.to_dict()))  # what checkpoints recorded before
    assert normalized_record(json.loads(json.dumps(config.recorded()))) == full == normalized_record(full)
    assert normalized_record(full | {"epochs": 9, "damp": 0.5}) == full  # never read by bcq-alternating
    assert normalized_record(full | {"iters": 3}) != full
    assert normalized_record({"method": "not-ours", "x": 1}) == {"method": "not-ours", "x": 1}


def test_validation_checks_only_what_the_method_reads_and_names_the_valid_range():
    """flexround ignores uniquanf's settings (quantize says so), so a value of one that uniquanf
    would refuse passes; dyngroup records group size -1 whatever it was given; a rate's error
    names the range it was checked against."""
    from unibcq.errors import UnibcqError

    QuantConfig("flexround", grid_points=0, remap_every=0, b_lr=-1.0, p_norm=0.0, mapping="?").validate()
    for bad in ({"grid_points": 0}, {"b_lr": -1.0}, {"p_norm": 0.0}, {"mapping": "?"}):
        with pytest.raises(UnibcqError, match=next(iter(bad))):
            QuantConfig("uniquanf", **bad).validate()
    assert QuantConfig("dyngroup", group_size=128).validate().recorded()["group_size"] == -1
    for name in ("damp", "u_lr"):
        flag = "--" + name.replace("_", "-")  # the CLI user's name of it beside the Python API's
        with pytest.raises(UnibcqError, match=rf"{name} \({flag}\) must be a finite number in \[0, 1000\), got 1000"):
            QuantConfig("flexround" if name == "u_lr" else "gptq", **{name: 1000.0}).validate()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_one_bit_uniform_grid_with_zero_as_a_level_is_refused(method):
    """At 1 bit a symmetric grid, or GPTQ's integer zero point, makes 0 one of the two levels:
    rtn quantized 99% of the weights to 0 (relative error 0.99). With a float zero point the
    levels are the group's min and max."""
    from unibcq.errors import UnibcqError

    for settings in ({}, {"symmetric": True}, {"symmetric": True, "integer_zero": False},
                     {"bits": 3, "overrides": {"*.q_proj": {"bits": 1}}}):
        with pytest.raises(UnibcqError, match="1 bit needs --float-zero"):
            QuantConfig(method, **{"bits": 1, **settings}).validate()
    QuantConfig(method, bits=1, integer_zero=False).validate()
    with pytest.raises(UnibcqError, match=r"got 9 \(--override \*\.q_proj\)"):  # names the override at fault
        QuantConfig(method, overrides={"*.q_proj": {"bits": 9}}).validate()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    packed = PER_MATRIX_METHODS["rtn"](weight, QuantConfig("rtn", bits=1, group_size=32, integer_zero=False))
    assert (packed.dequantize() != 0).float().mean() > 0.99

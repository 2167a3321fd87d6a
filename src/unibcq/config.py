"""Quantization settings: one versioned, JSON-serialisable dataclass.

The same object drives quantization and is recorded in the checkpoint's
`quantization_config`, together with the per-layer layout needed to rebuild the model. The
record lists only the settings the method reads: a bcq-alternating checkpoint that listed
UniQuanF's learning rates would claim settings that had no effect on it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from unibcq.errors import UnibcqError
from unibcq.formats.bcq import MAX_BITS, MIN_BITS, validate_group_size
from unibcq.formats.grouped_binary import MAX_GROUPS

FORMAT_VERSION = 1


@dataclass
class QuantConfig:
    """What to quantize and how.

    bits and group_size default to the method's own: 1-bit signs in groups the algorithm
    finds (-1) for dyngroup, 3 bits in groups of 128 for the rest, so `QuantConfig("dyngroup")`
    is valid as written, as `unibcq quantize --method dyngroup` is.

    overrides: fnmatch pattern on the layer's full name -> {"bits": n, "group_size": g};
    the first matching pattern wins (e.g. {"*.mlp.down_proj": {"bits": 4}}).

    Calibrated methods' training and calibration fields default to values that are neither
    preset (2 epochs on 128 x 2048-token windows, say); build them with `from_preset` for
    the settings the CLI uses, the authors' (`paper`) or the CPU-sized `fast`.

    A checkpoint leaves out the settings its method does not read, and they count at these
    defaults when records are compared (`normalized_record`): changing a default here changes
    which checkpoints of the methods that ignore it compare equal to earlier ones.
    """

    method: str
    bits: int = None  # type: ignore[assignment]  # the method's default, set in __post_init__
    group_size: int = None  # type: ignore[assignment]
    symmetric: bool = False
    clip_search: bool = False
    integer_zero: bool = True
    offset: bool = True
    iters: int = 15
    init: str = "greedy+uniform"
    include_lm_head: bool = False
    algorithm: str = "windowed"
    max_groups: int = 32
    lam: float = 0.75
    window: int = 256
    granularity: str = "matrix"
    normalize_lambda: bool = True
    dp_atom_size: int = 1
    refine_sweeps: int = 0
    merge_rule: str = "objective"
    damp: float = 0.01
    act_order: bool = False
    true_sequential: bool = False
    epochs: int = 2
    u_lr: float = 5e-3
    b_lr: float = 5e-4
    remap_every: int = 2
    grid_points: int = 1
    p_norm: float = 2.4
    shift: bool = False
    mapping: str = "local"
    batch_size: int = 1
    input_prob: float = 0.5
    calib: str | None = None
    calib_samples: int = 128
    calib_seq_len: int = 2048
    overrides: dict[str, dict[str, int]] = field(default_factory=dict)
    seed: int = 0
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        binary = self.method == "dyngroup"
        if self.bits is None:
            self.bits = 1 if binary else 3
        if binary:  # its groups are found per weight, not fixed: what every dyngroup record says
            self.group_size = -1
        elif self.group_size is None:
            self.group_size = 128

    @classmethod
    def from_preset(cls, method: str, preset: str = "fast", calib: str = "wikitext2", **fields: Any) -> QuantConfig:
        """`method`'s config with `preset`'s calibration and training settings, as `unibcq quantize
        --preset` builds it; `fields` (bits, group_size, epochs, calib_seq_len, ...) override any of them."""
        from unibcq.methods.presets import apply_preset, preset_values

        given = {"seq_len" if k == "calib_seq_len" else k: v for k, v in fields.items()}
        return apply_preset(cls(method, **fields), preset_values(preset, given), calib).validate()

    def validate(self) -> "QuantConfig":
        from unibcq.methods.registry import check_method

        check_method(self.method)
        if not isinstance(self.overrides, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in self.overrides.items()
        ):
            raise UnibcqError("overrides must map a layer-name pattern to {'bits': N, 'group_size': G}")
        for pattern in [None, *self.overrides]:
            cfg = self if pattern is None else self.for_pattern(pattern)
            try:
                if not isinstance(cfg.bits, int) or isinstance(cfg.bits, bool) or not MIN_BITS <= cfg.bits <= MAX_BITS:
                    raise UnibcqError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS} for method {self.method}, "
                                      f"got {cfg.bits!r}")
                validate_group_size(cfg.group_size)
                self._validate_uniform_bits(cfg.bits)
            except UnibcqError as exc:
                if pattern is None:
                    raise
                raise UnibcqError(f"{exc} (--override {pattern})") from None
        if self.method == "dyngroup":
            self._validate_dyngroup()
        _check_rate("damp", self.damp)
        if self.method in ("uniquanf", "flexround"):
            self._validate_reconstruction()
        gptq_only = [name for name in ("act_order", "true_sequential") if getattr(self, name)]
        if gptq_only and self.method not in ("gptq", "gptq-bcq"):
            raise UnibcqError(f"{' and '.join(gptq_only)} apply to gptq and gptq-bcq, not {self.method}")
        if type(self.iters) is not int or self.iters < 0:
            raise UnibcqError(f"{_named('iters')} must be an integer >= 0, got {self.iters!r}")
        if self.init not in ("greedy", "greedy+uniform"):
            raise UnibcqError(f"unknown alternating init {self.init!r}; use 'greedy' or 'greedy+uniform'")
        return self

    def _validate_uniform_bits(self, bits: int) -> None:
        """A 1-bit uniform grid has two levels; a symmetric one or one with GPTQ's integer zero
        point puts 0 on one of them, which quantizes most weights of a row to 0."""
        if bits == 1 and self.method in ("rtn", "gptq") and (self.symmetric or self.integer_zero):
            raise UnibcqError(f"{self.method} at 1 bit needs --float-zero without --symmetric (integer_zero=False, "
                              "symmetric=False: the grid's two levels are then the group's min and max; with an "
                              "integer zero point or a symmetric grid one level is 0); for 1-bit signs use a bcq-* "
                              "method or dyngroup")

    def _validate_dyngroup(self) -> None:
        from unibcq.formats.grouped_binary import parse_granularity

        if self.bits != 1:
            raise UnibcqError(f"dyngroup stores 1-bit signs; bits must be 1, got {self.bits}")
        for pattern, override in self.overrides.items():
            if override.get("bits", 1) != 1:
                raise UnibcqError(f"dyngroup stores 1-bit signs; bits must be 1, got {override['bits']} "
                                  f"(--override {pattern})")
        if self.algorithm not in ("dp", "greedy", "windowed"):
            raise UnibcqError(f"unknown dyngroup algorithm {self.algorithm!r}; use dp, greedy or windowed")
        for name in ("max_groups", "window", "dp_atom_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise UnibcqError(f"{_named(name)} must be an integer >= 1, got {value!r}")
        if type(self.refine_sweeps) is not int or self.refine_sweeps < 0:
            raise UnibcqError(f"{_named('refine_sweeps')} must be an integer >= 0, got {self.refine_sweeps!r}")
        if self.merge_rule not in ("objective", "paper"):
            raise UnibcqError(f"unknown dyngroup merge rule {self.merge_rule!r}; use objective or paper")
        if self.max_groups > MAX_GROUPS:
            raise UnibcqError(f"{_named('max_groups')} must be <= {MAX_GROUPS} (8-bit group index), got {self.max_groups}")
        if not isinstance(self.lam, (int, float)) or not self.lam >= 0 or self.lam == float("inf"):
            raise UnibcqError(f"{_named('lam')} must be a finite number >= 0, got {self.lam!r}")
        parse_granularity(self.granularity)

    def _validate_reconstruction(self) -> None:
        """The training settings of uniquanf and flexround, each checked only for a method that
        reads it (flexround ignores uniquanf's re-mapping and BCQ settings, as quantize notes)."""
        from unibcq.methods.registry import reads_setting

        def read(name: str) -> bool:
            return reads_setting(self.method, name)

        for name in filter(read, ("epochs", "remap_every", "grid_points", "batch_size")):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise UnibcqError(f"{_named(name)} must be an integer >= 1, got {value!r}")
        for name in filter(read, ("u_lr", "b_lr")):
            _check_rate(name, getattr(self, name))
        if read("p_norm") and (not isinstance(self.p_norm, (int, float)) or not 0 < self.p_norm < 1e3):
            raise UnibcqError(f"p_norm must be a finite number in (0, 1000), got {self.p_norm!r}")
        if not isinstance(self.input_prob, (int, float)) or not 0 <= self.input_prob <= 1:
            raise UnibcqError(f"{_named('input_prob')} must be in [0, 1], got {self.input_prob!r}")
        if read("mapping") and self.mapping not in ("local", "global", "direct"):
            raise UnibcqError(f"{_named('mapping')} must be local, global or direct, got {self.mapping!r}")

    def for_pattern(self, pattern: str) -> "QuantConfig":
        allowed = {"bits", "group_size"}
        extra = set(self.overrides[pattern]) - allowed
        if extra:
            raise UnibcqError(f"override {pattern!r} sets {sorted(extra)}; only {sorted(allowed)} can be overridden")
        unset = sorted(k for k, v in self.overrides[pattern].items() if v is None)
        if unset:  # None would mean the method's default, not this layer's setting
            raise UnibcqError(f"override {pattern!r} gives no value for {', '.join(unset)}")
        return replace(self, overrides={}, **self.overrides[pattern])

    def for_layer(self, name: str) -> "QuantConfig":
        """Settings for one layer after applying the first matching override."""
        for pattern in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return self.for_pattern(pattern)
        return self

    def check_overrides(self, layer_names: Iterable[str]) -> None:
        """Raise when an override pattern matches none of `layer_names`: almost always a typo,
        which would otherwise quantize every layer at the default settings without a word."""
        names = list(layer_names)
        unmatched = [p for p in self.overrides if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            hint = "" if self.include_lm_head else "; lm_head needs --quantize-lm-head"
            raise UnibcqError(f"override pattern(s) {unmatched} match no quantized layer (names look like "
                              f"{names[0] if names else 'none'!r}; patterns are fnmatch on the full name, "
                              f"e.g. '*.mlp.down_proj'{hint})")

    def to_dict(self) -> dict[str, Any]:
        """Every setting, read or not (what a resumable run must match to be continued)."""
        return asdict(self)

    def recorded(self) -> dict[str, Any]:
        """The settings this method reads: what a checkpoint and a compare result record."""
        from unibcq.methods.registry import reads_setting

        return {k: v for k, v in asdict(self).items() if reads_setting(self.method, k)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# Settings whose quantize flag is not --NAME-WITH-DASHES; None: no flag (Python API only).
_FLAG_NAMES: dict[str, str | None] = {"lam": "--lambda", "p_norm": None, "calib_seq_len": "--seq-len"}


def _named(field_name: str) -> str:
    """A setting as errors name it: the field of the Python API and the flag of the CLI."""
    flag = _FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))
    return field_name if flag is None else f"{field_name} ({flag})"


def _check_rate(name: str, value: object) -> None:
    """A damping fraction or learning rate: a finite number in [0, 1000) (bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e3:
        raise UnibcqError(f"{_named(name)} must be a finite number in [0, 1000), got {value!r}")


def _unread_defaults(record: dict[str, Any]) -> dict[str, Any]:
    """The defaults of the settings a stored config's method does not read (none for a method
    unibcq does not know)."""
    from unibcq.methods.registry import METHODS, reads_setting

    method = record.get("method")
    if method not in METHODS:
        return {}
    return {f.name: f.default for f in fields(QuantConfig) if f.default is not MISSING
            and not reads_setting(method, f.name)}


def lists_unread_settings(record: dict[str, Any]) -> bool:
    """Whether a stored quantization config lists settings its method does not read, as every
    checkpoint written before 2026-12-07 did."""
    return any(name in record for name in _unread_defaults(record))


def normalized_record(record: dict[str, Any]) -> dict[str, Any]:
    """A stored quantization config with every setting its method does not read at its default,
    so that two records of one quantization compare equal whether they list unread settings
    (checkpoints before 2026-12-07) or not. Entries that are not settings (the format, the layer
    layout) are kept as they are. (Changing the default of a setting changes what records of the
    methods that never read it normalize to, on both sides of every comparison alike.)
    """
    return record | _unread_defaults(record)

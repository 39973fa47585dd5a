"""Validated ablation switches of the StageInteractor decoder (the one place listing allowed values).

Every switch is a keyword argument of :class:`~stageinteractor.core.decoder.StageInteractorDecoder`.
:func:`resolve_switches` validates them (``ValueError`` naming the switch and the allowed values)
and resolves the reuse-related ``None`` defaults into a frozen :class:`DecoderSwitches`.

Paper table -> switch:

* Tab. 6 (reuse on/off) ............. ``reuse``
* Tab. 8 (reused spatial filters) ... ``num_reused_spatial_filters`` in {0, 1, 3}
* Tab. 10 (max Δγ) ................. ``max_reused_channel_filters`` in 0..4
* Tab. 11 (filter usage) ........... ``filter_usage`` in {"none", "previous", "current", "adapter"}
* Tab. 15 (dynamic / static only) .. ``filter_usage="none"`` (static only) or
  ``static_mixing="none"`` (dynamic only)
* Tab. 16 (static mixing type) ..... ``static_mixing``
* Tab. 17 (sampler) ................ ``sampler`` in {"grouped", "3d", "3d_group_init"}
* Tab. 18 (first-stage points) ..... ``first_stage_points`` in {32, 64}
* paper-vs-code variants ........... ``refine_mode`` ("wh" | "2z"), ``subpoint_offsets``
  ("shared" | "per_group"), ``pe_residual`` ("stream" | "query"), ``dynamic_bias``.
"""
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, Optional

__all__ = [
    "SAMPLERS",
    "SUBPOINT_OFFSETS",
    "REFINE_MODES",
    "PE_RESIDUALS",
    "FILTER_USAGES",
    "STATIC_MIXINGS",
    "FIRST_STAGE_POINTS",
    "NUM_REUSED_SPATIAL",
    "ADAMIXER_BASELINE",
    "DecoderSwitches",
    "check_choice",
    "resolve_switches",
]

SAMPLERS = ("grouped", "3d", "3d_group_init")
SUBPOINT_OFFSETS = ("shared", "per_group")
REFINE_MODES = ("wh", "2z")
# "stream": released code, x = q + pe and out = x + MHSA(x) (pe enters the content stream);
# "query":  paper / DETR style residual on q, out = q + MHSA(x).
PE_RESIDUALS = ("stream", "query")
FILTER_USAGES = ("none", "previous", "current", "adapter")
STATIC_MIXINGS = ("none", "channel", "spatial", "channel_spatial")
FIRST_STAGE_POINTS = (32, 64)
NUM_REUSED_SPATIAL = (0, 1, 3)
MAX_REUSED_CHANNEL = (0, 1, 2, 3, 4)

# Paper Tab. 6 first row: AdaMixer with 64 first-stage points (no reuse, no dynamic biases,
# AdaMixer's 3-D sampler and 2^z refinement).
ADAMIXER_BASELINE: Dict[str, Any] = dict(
    sampler="3d", refine_mode="2z", reuse=False, dynamic_bias=False, first_stage_points=64
)


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``; otherwise raise a ValueError naming both."""
    allowed = tuple(allowed)
    # bool is an int subclass: do not let True/False pass for 1/0 (or the reverse).
    ok = any(value == a and type(value) is type(a) for a in allowed)
    if not ok:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


@dataclass(frozen=True)
class DecoderSwitches:
    """Resolved, validated switches (see module docstring)."""

    sampler: str = "grouped"
    subpoint_offsets: str = "shared"
    refine_mode: str = "wh"
    pe_residual: str = "stream"
    dynamic_bias: bool = True
    first_stage_points: int = 64
    reuse: bool = True
    reuse_start: int = 2
    max_reused_channel_filters: int = 4
    num_reused_spatial_filters: int = 1
    filter_usage: str = "adapter"
    static_mixing: str = "channel_spatial"

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def resolve_switches(
    *,
    num_stages: int,
    sampler: str = "grouped",
    subpoint_offsets: str = "shared",
    refine_mode: str = "wh",
    pe_residual: str = "stream",
    dynamic_bias: bool = True,
    first_stage_points: int = 64,
    reuse: bool = True,
    reuse_start: int = 2,
    max_reused_channel_filters: Optional[int] = None,
    num_reused_spatial_filters: Optional[int] = None,
    filter_usage: Optional[str] = None,
    static_mixing: Optional[str] = None,
) -> DecoderSwitches:
    """Validate every switch and resolve the reuse defaults.

    With ``reuse=True`` the ``None`` defaults become the released configuration
    (4 channel filters, 1 spatial filter, adapters, channel-spatial static mixing).
    With ``reuse=False`` nothing is reused and no adapter/static module exists; passing a
    reuse-only switch with a non-neutral value then raises a ValueError (it would be dead).
    """
    check_choice("sampler", sampler, SAMPLERS)
    check_choice("subpoint_offsets", subpoint_offsets, SUBPOINT_OFFSETS)
    check_choice("refine_mode", refine_mode, REFINE_MODES)
    check_choice("pe_residual", pe_residual, PE_RESIDUALS)
    check_choice("dynamic_bias", dynamic_bias, (True, False))
    check_choice("first_stage_points", first_stage_points, FIRST_STAGE_POINTS)
    check_choice("reuse", reuse, (True, False))
    # (a decoder with num_stages <= reuse_start has no reuse stage; allowed for small test decoders)
    check_choice("reuse_start", reuse_start, tuple(range(1, max(num_stages, 3))))
    if sampler != "grouped" and subpoint_offsets != "shared":
        raise ValueError(
            f"subpoint_offsets={subpoint_offsets!r} only applies to sampler='grouped' "
            f"(got sampler={sampler!r}); allowed for the 3-D samplers: ('shared',)"
        )
    if reuse:
        max_c = 4 if max_reused_channel_filters is None else max_reused_channel_filters
        n_s = 1 if num_reused_spatial_filters is None else num_reused_spatial_filters
        usage = "adapter" if filter_usage is None else filter_usage
        static = "channel_spatial" if static_mixing is None else static_mixing
        check_choice("max_reused_channel_filters", max_c, MAX_REUSED_CHANNEL)
        check_choice("num_reused_spatial_filters", n_s, NUM_REUSED_SPATIAL)
        check_choice("filter_usage", usage, FILTER_USAGES)
        check_choice("static_mixing", static, STATIC_MIXINGS)
        if max_c == 0 and n_s == 0:
            raise ValueError(
                "reuse=True needs max_reused_channel_filters > 0 or num_reused_spatial_filters > 0 "
                "(allowed: max_reused_channel_filters in (1..4) or num_reused_spatial_filters in "
                "(1, 3)); use reuse=False for no reuse"
            )
        if max_c == 0 and (filter_usage is not None or static_mixing is not None):
            raise ValueError(
                "filter_usage/static_mixing act on reused channel filters; with "
                "max_reused_channel_filters=0 they must be left unset (None)"
            )
    else:
        for name, value, neutral in (
            ("max_reused_channel_filters", max_reused_channel_filters, 0),
            ("num_reused_spatial_filters", num_reused_spatial_filters, 0),
            ("filter_usage", filter_usage, "none"),
            ("static_mixing", static_mixing, "none"),
        ):
            if value is not None and value != neutral:
                raise ValueError(
                    f"{name}={value!r} has no effect with reuse=False; allowed: (None, {neutral!r})"
                )
        max_c, n_s, usage, static = 0, 0, "none", "none"
    return DecoderSwitches(
        sampler=sampler,
        subpoint_offsets=subpoint_offsets,
        refine_mode=refine_mode,
        pe_residual=pe_residual,
        dynamic_bias=dynamic_bias,
        first_stage_points=first_stage_points,
        reuse=reuse,
        reuse_start=reuse_start,
        max_reused_channel_filters=max_c,
        num_reused_spatial_filters=n_s,
        filter_usage=usage,
        static_mixing=static,
    )

#!/usr/bin/env python3
r"""Convert the authors' StageInteractor checkpoints (mmdet 2.12 fork) to this project's layout.

Usage::

    # official epoch_36.pth -> detectron2 checkpoint (load with train.init_checkpoint=OUT.pth)
    python tools/convert_official_checkpoint.py epoch_36.pth OUT.pth \
        [--config configs/stageinteractor/stageinteractor_x101_dcn_300q_crop_mstrain_3x.py]

    # a checkpoint trained here -> the authors' layout (evaluate with their code)
    python tools/convert_official_checkpoint.py --reverse model_final.pth OUT_official.pth

Accepts R50 / R101 / X101-DCN / Swin-S backbones, any number of queries and of classes (read
from the checkpoint), both directions; the decoder has the released 6 stages. Needs no
detectron2 unless ``--config`` is given. The optimiser state and ``meta`` are dropped; so are the dead ``subbox_score``
layers (checked to be zero, a warning names them otherwise) and the constant buffers. With
``--config`` the converted state dict is also checked against the model that the config builds
(every key present, same shapes, nothing extra).

An unknown key, a missing key or a shape mismatch stops the conversion with one message naming
the key, the shape found and the shape expected; an unreadable, truncated or foreign file stops
it with one message. No output file is written unless the conversion succeeds (the output is
written to a temporary file and renamed).

The output of the forward direction is ``{"model": state_dict, "__author__": ...}``, the format
detectron2's ``DetectionCheckpointer`` reads; the reverse direction writes
``{"meta": {...}, "state_dict": state_dict}`` as mmcv's ``save_checkpoint`` does.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stageinteractor.official.checkpoint import (  # noqa: E402
    ConversionError,
    check_against_model,
    convert_official_to_ours,
    convert_ours_to_official,
    extract_official_state_dict,
    load_checkpoint_file,
    save_atomically,
)


def model_state_from_config(config_file: str):
    """State dict (shapes) of the model that ``config_file`` builds (needs detectron2)."""
    from stageinteractor.requirements import require

    require("tools/convert_official_checkpoint.py --config", "detectron2")
    from stageinteractor.d2.config_model import build_config_model

    try:
        return build_config_model(config_file).state_dict()
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 - one message naming the config
        raise ConversionError(f"{config_file}: cannot build cfg.model ({type(e).__name__}: {e})") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="input checkpoint (.pth)")
    p.add_argument("output", help="output checkpoint (.pth); written only on success")
    p.add_argument("--config", default=None, help="LazyConfig whose model must load the result")
    p.add_argument("--reverse", action="store_true",
                   help="convert a checkpoint of this project to the authors' layout")
    return p.parse_args(argv)


def run(args) -> int:
    obj = load_checkpoint_file(args.input)
    if args.reverse:
        sd, ignored, _ = extract_official_state_dict(obj, args.input)
        if args.config:
            check_against_model(sd, model_state_from_config(args.config), args.input)
        out_sd = convert_ours_to_official(sd, source=args.input)
        n_dead = sum(1 for k in out_sd if ".subbox_score_list." in k)
        save_atomically({"meta": {"converted_from": os.path.basename(args.input),
                                  "converter": "stageinteractor tools/convert_official_checkpoint.py --reverse"},
                         "state_dict": out_sd}, args.output)
        print(f"wrote {args.output}: {len(sd)} keys mapped to {len(out_sd)} official keys "
              f"({len(out_sd) - len(sd)} regenerated: {n_dead} dead subbox_score tensors as zeros, "
              f"constant buffers); ignored top-level entries: {ignored or 'none'}")
        return 0

    sd, ignored, meta = extract_official_state_dict(obj, args.input)
    out_sd, report = convert_official_to_ours(sd, source=args.input, meta=meta)
    report.ignored_top_level = ignored
    if args.config:
        check_against_model(out_sd, model_state_from_config(args.config), f"{args.input} (converted)")
    save_atomically({"model": out_sd, "__author__": "stageinteractor convert_official_checkpoint"}, args.output)
    print(report.summary())
    print(f"wrote {args.output} ({len(out_sd)} keys)")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

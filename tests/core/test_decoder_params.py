"""Parameter counts of the full-size decoders (built on the meta device: no memory, no init cost).

Spec §3 arithmetic: the official decoder (``roi_head``, R50, 100 queries, 80 classes) has
112,759,048 parameters of which 328,960 are the dead ``subbox_score`` layers, which we do not
build: 112,430,088. The query embedding (25,600) is a separate module inside our decoder
(``query_generator``). AdaMixer with the same counting: total 134.79M (32 points every stage) or
139.10M (64 first-stage points) where total = backbone 23,508,032 + neck 984,576 + query
embedding 25,600 + decoder.
"""
import pytest
import torch

from stageinteractor.core.decoder import StageInteractorDecoder

BACKBONE_R50, NECK, QUERY_EMB = 23_508_032, 984_576, 25_600
OFFICIAL_STAGE = [22_718_932, 18_495_908, 17_047_972, 17_606_692, 18_165_412, 18_724_132]
DEAD = [0, 0, 32_896, 65_792, 98_688, 131_584]  # subbox_score Linear(256 -> 128) per reuse


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def meta_decoders():
    with torch.device("meta"):
        return {
            "si": StageInteractorDecoder(),
            "ada64": StageInteractorDecoder.adamixer(),
            "ada32": StageInteractorDecoder.adamixer(first_stage_points=32),
        }


def test_stageinteractor_decoder_count(meta_decoders):
    d = meta_decoders["si"]
    assert sum(OFFICIAL_STAGE) == 112_759_048 and sum(DEAD) == 328_960
    assert [count(st) for st in d.stages] == [o - x for o, x in zip(OFFICIAL_STAGE, DEAD)]
    assert count(d.stages) == 112_759_048 - 328_960 == 112_430_088
    assert count(d.query_generator) == QUERY_EMB
    assert count(d) == 112_430_088 + QUERY_EMB
    # detector total of spec §3 / checkpoint layout §3, minus the dead layers
    assert BACKBONE_R50 + NECK + count(d) == 137_277_256 - 328_960


def test_adamixer_baseline_counts(meta_decoders):
    """AdaMixer stage = MHSA 263,168 + LN 512 + tau 8 + offsets Linear(256 -> 4*P*3)
    + parameter generator Linear(256 -> 4*(64*64 + P*128)) + out_proj 8,388,864 + LN 512
    + FFN 1,050,880 + LN 512 + cls/reg branches 154,196 (no dynamic biases, no reuse)."""
    def stage(P):
        return (263_168 + 512 + 8 + (256 * 12 * P + 12 * P) + (256 + 1) * 4 * (4096 + 128 * P)
                + 8_388_864 + 512 + 1_050_880 + 512 + 66_304 + 20_560 + 66_304 + 1_028)

    ada64, ada32 = meta_decoders["ada64"], meta_decoders["ada32"]
    assert [count(st) for st in ada32.stages] == [stage(32)] * 6
    assert count(ada32.stages) == 6 * stage(32) == 110_272_296
    assert count(ada64.stages) == stage(64) + 5 * stage(32) == 114_581_672
    tot32 = BACKBONE_R50 + NECK + QUERY_EMB + count(ada32.stages)
    tot64 = BACKBONE_R50 + NECK + QUERY_EMB + count(ada64.stages)
    assert (tot32, tot64) == (134_790_504, 139_099_880)
    assert round(tot32 / 1e6, 2) == 134.79 and round(tot64 / 1e6, 2) == 139.10

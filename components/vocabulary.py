"""The study's words, named once: the kinds of readout (and so the baselines' names, as they
appear in a loss table's `sources`), and the loss table's columns. Torch-free and Ray-free, so
every room from the CLI to the plots can say them without loading anything.

A loss table (design.md section 2) has one row per (target, source set, replicate, test image):
`target`, `sources` (a sorted list of task names, or one baseline name), `image_id`, `loss`, and
optionally `replicate` (absent: replicate 0).
"""

from __future__ import annotations

from enum import Enum


class ReadoutKind(str, Enum):
    TRANSFER = "transfer"  # features of one or more source encoders
    SELF = "self"  # the target's fully supervised network (Stage I): read, not trained
    PIXELS = "pixels"  # raw pixels, rearranged to the representation's shape
    RANDOM = "random"  # a frozen random-init encoder
    # A whole task network trained from scratch on the readouts' labelled images: the reference
    # for Gain when a new task is positioned with few labels (design.md section 12)
    SCRATCH = "scratch"


BASELINES = (ReadoutKind.SELF, ReadoutKind.PIXELS, ReadoutKind.RANDOM)  # a study's default
ALL_BASELINES = (*BASELINES, ReadoutKind.SCRATCH)
# Their names, as a loss table's `sources` spells them
SELF, PIXELS, RANDOM, SCRATCH = (k.value for k in ALL_BASELINES)
BASELINE_NAMES = frozenset(k.value for k in ALL_BASELINES)

# The loss table's columns
TARGET, SOURCES, IMAGE_ID, LOSS, REPLICATE = "target", "sources", "image_id", "loss", "replicate"
LOSS_COLUMNS = (TARGET, SOURCES, IMAGE_ID, LOSS)  # required; REPLICATE is optional

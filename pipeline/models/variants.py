"""How the guided model uses the baseline's knowledge: one row of properties per variant.

``train_guided.variant`` names a row; every other module asks for its properties, never for its
name. The saliency map H of the baseline and the Otsu pseudo-masks are defined in docs/method.md.

| variant      | prior H as input (training) | segmentation head | H at inference | auxiliary loss target |
|--------------|-----------------------------|-------------------|----------------|-----------------------|
| teacher      | yes (the paper)             | yes               | the baseline's | pseudo-masks          |
| none         | yes, dropped at random      | yes               | zeros          | pseudo-masks          |
| no_injection | no                          | yes (training)    | none           | pseudo-masks          |
| consistency  | no                          | no                | none           | saliency maps         |

Variants that read no prior at inference deploy exactly the baseline's graph.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    injects_prior: bool  # H joins the stride-16 features and the classifier's pooled inputs
    has_head: bool  # a segmentation head S, trained on the pseudo-masks
    prior_at_inference: bool  # inference needs the baseline's saliency map (one more model pass)
    drops_prior: bool  # trained with H zeroed for a share of images (train_guided.prior_dropout)
    # What the auxiliary loss pulls toward: the pseudo-masks (BCE on S) or the saliency maps
    # (the model's own Grad-CAM towards H, ``losses.consistency_loss``).
    target: str
    summary: str

    @property
    def has_finer_heads(self) -> bool:
        """Whether it may have heads on strides finer than 16 too (``train_guided.head_strides``):
        a head, and features that are the backbone's own (no prior joined at stride 16)."""
        return self.has_head and not self.injects_prior

    @property
    def learns_own_grad_cam(self) -> bool:
        """Whether its auxiliary loss is on its own Grad-CAM, at the strides ``train_guided.cam_strides``."""
        return self.target == SALIENCY_MAPS

    @property
    def deploys_baseline_graph(self) -> bool:
        """Whether the deployed model is a plain ``Classifier`` (the head is training-only)."""
        return not self.injects_prior


PSEUDO_MASKS, SALIENCY_MAPS = "pseudo_masks", "saliency_maps"

# fmt: off
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("teacher", injects_prior=True, has_head=True, prior_at_inference=True, drops_prior=False,
            target=PSEUDO_MASKS, summary="the paper: H as input at training and inference"),
    Variant("none", injects_prior=True, has_head=True, prior_at_inference=False, drops_prior=True,
            target=PSEUDO_MASKS, summary="as teacher, trained with H dropped at random, zeros at inference"),
    Variant("no_injection", injects_prior=False, has_head=True, prior_at_inference=False, drops_prior=False,
            target=PSEUDO_MASKS, summary="no H channel; the head only adds a loss"),
    Variant("consistency", injects_prior=False, has_head=False, prior_at_inference=False, drops_prior=False,
            target=SALIENCY_MAPS, summary="no head: the model's own Grad-CAM is pulled towards H"),
)}
# fmt: on

# Models saved before variants existed are teacher models.
LEGACY_VARIANT = "teacher"


def variant_of(config: dict) -> Variant | None:
    """The variant of a saved model's config; None for a baseline."""
    if config["kind"] != "guided":
        return None
    return VARIANTS[config.get("variant", LEGACY_VARIANT)]

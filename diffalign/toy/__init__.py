"""The toy worlds: text-to-image tasks small enough to pretrain, align and evaluate on a laptop CPU.

* ``duo`` (the quickstart's world): two coloured shapes side by side, 32x32, captions such as "a red circle to the
  left of a blue square" (both relation words); the fixed split of its 504 scenes into 192 labelling and 48
  held-out prompts. ``duo_reward``: GenEval-style detectors (colour, shape, left/right relation, GenEval's binary
  "correct"), also ``diffalign.scorers.duofaithfulness`` / ``duocorrect`` / ``duocolor`` / ``duoshape`` /
  ``duoposition``. Base: ``assets/toy_duo``.
* ``world`` (the first toy world, "shapes"): one coloured shape on a coloured background, 32x32; the split of its
  168 prompts into 126 labelling and 42 held-out ones. ``reward``: prompt faithfulness checked analytically times a
  preference for large objects (``diffalign.scorers.toyreward`` / ``toyfaithfulness`` / ``toyprominence``). Base:
  ``assets/toy_base``.
* ``model``: the SD1.5-family architecture of both base models (``recipes/pretrain_toy.py --world duo|shapes``
  trains them); ``worlds``: what the quickstart and the alignment bench need of each world.

``diffalign quickstart`` aligns the duo base with Diffusion-DPO on detector AI feedback; ``bench/alignment_toy.py``
compares every objective on the same task (``--world shapes`` for the first world).
"""

"""Training code of the two shipped demo models -- kept out of the runtime package.

* :mod:`medfocus.training.demo_lvlm`: the demo CXR-VQA LVLM (Qwen2.5-VL architecture) shipped in
  ``medfocus/lvlm/demo_model`` (``medfocus train-demo --out DIR``);
* :mod:`medfocus.training.demo_segmenter`: the box-prompted synthetic-world segmenter (a tiny
  ``SamModel``) shipped in ``medfocus/concepts/synthetic_sam`` (``medfocus train-demo-sam --out DIR``).

The runtime (everything else under ``medfocus``) loads and uses the shipped folders without importing
this package (checked by a test); only the ``train-demo*`` commands and the tests import it. Both
trainers require an output folder: the shipped folders are regenerated only when named on purpose.
"""
